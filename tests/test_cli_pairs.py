"""`equilibrate pairs` end to end on the tiny model: samples cached and resumed, pairs written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from equilibrate_pl.cli import main as cli
from equilibrate_pl.data.pairs import prompt_key


def _prompts(path: Path) -> list[dict]:
    from equilibrate_pl.data.world import build_world

    world = build_world(seed=0, size="tiny")
    rows = world.prompts("train", ["EHD"])[:3] + world.prompts("train", ["general"])[:3]
    path.write_text("".join(json.dumps({"id": r["id"], "prompt": r["prompt"], "group": r["group"]}) + "\n" for r in rows))
    return rows


def test_pairs_sample_once_then_reuse_and_resume(tmp_path: Path, equilibrate_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = _prompts(tmp_path / "prompts.jsonl")
    common = ["--model", "builtin:tiny", "--input", str(tmp_path / "prompts.jsonl"), "--num-samples", "2",
              "--max-new-tokens", "6", "--batch-size", "4", "--samples", str(tmp_path / "samples.jsonl")]
    assert cli(["pairs", *common, "--output", str(tmp_path / "fdc.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "sampling 2 answers for 6 prompts" in out
    cached = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in cached) == sorted(prompt_key(r["prompt"]) for r in rows)
    assert all(len(r["samples"]) == 2 for r in cached)

    # Same prompts, other labels: nothing is sampled again.
    assert cli(["pairs", *common, "--as-harmful", "--output", str(tmp_path / "naive.jsonl")]) == 0
    assert "sampling" not in capsys.readouterr().out

    # A killed run: one finished batch line and a torn one. Only the missing prompts are sampled.
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    (tmp_path / "samples.jsonl").write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    assert cli(["pairs", *common, "--output", str(tmp_path / "again.jsonl")]) == 0
    assert "sampling 2 answers for 5 prompts with builtin:tiny (1 cached)" in capsys.readouterr().out
    again = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert again[0] == first  # the finished line was kept, not redrawn; the torn one is gone
    assert sorted(r["key"] for r in again) == sorted(prompt_key(r["prompt"]) for r in rows)


def test_pairs_needs_groups(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "p.jsonl").write_text('{"prompt": "how do I bake bread"}\n')
    code = cli(["pairs", "--model", "builtin:tiny", "--input", str(tmp_path / "p.jsonl"), "--output", str(tmp_path / "o.jsonl")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "p.jsonl" in err[0] and "group" in err[0]

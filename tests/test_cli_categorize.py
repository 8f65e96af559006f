"""`equilibrate categorize` / `synthesize-mhd` end to end on the three real files."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from equilibrate_pl.cli import main as cli


def _printed_counts(out: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(EHD|IHD|MHD|general)\s+(\d+)\s", out, re.MULTILINE)}


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_categorize_xstest_rules(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "x.jsonl"
    assert cli(["categorize", "--input", str(shared_data / "xstest" / "xstest_prompts.csv"), "--preset", "xstest",
                "--method", "rules", "--output", str(out)]) == 0
    rows = _read(out)
    assert len(rows) == 450 and all(r["group"] in {"EHD", "IHD", "MHD", "general"} for r in rows)
    assert [r["meta"]["label"] for r in rows].count("safe") == 250  # every input row, its fields kept
    printed = capsys.readouterr().out
    assert _printed_counts(printed) == dict(Counter(r["group"] for r in rows))
    assert "total" in printed and "450" in printed


def test_categorize_beavertails_labels_raw_columns(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "b.jsonl"
    path = shared_data / "beavertails-fdc" / "beavertails_selected_relabelled.json"
    assert cli(["categorize", "--input", str(path), "--text-field", "question_y", "--method", "labels",
                "--label-field", "category", "--output", str(out)]) == 0
    rows = _read(out)
    raw = json.loads(path.read_text())
    assert [r["prompt"] for r in rows] == [r["question_y"] for r in raw]
    assert _printed_counts(capsys.readouterr().out) == {"EHD": 433, "IHD": 1550, "MHD": 482, "general": 559}


def test_categorize_hh_rlhf_rules_skip(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "h.jsonl"
    path = shared_data / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    assert cli(["categorize", "--input", str(path), "--preset", "hh-rlhf", "--on-bad-row", "skip",
                "--method", "rules", "--output", str(out)]) == 0
    rows = _read(out)
    printed = capsys.readouterr().out
    assert len(rows) == 2303 and "9 rows skipped" in printed  # the skips are reported, not silent
    assert all(r["chosen"] and r["rejected"] and isinstance(r["prompt"], list) for r in rows)
    assert sum(_printed_counts(printed).values()) == 2303
    # without --on-bad-row skip the bad row is named and nothing is written
    assert cli(["categorize", "--input", str(path), "--preset", "hh-rlhf", "--method", "rules", "--output", str(tmp_path / "n.jsonl")]) == 1
    assert "row 87, field 'chosen'" in capsys.readouterr().err and not (tmp_path / "n.jsonl").exists()


def test_synthesize_mhd_cli(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = shared_data / "beavertails-fdc" / "beavertails_selected_relabelled.json"
    args = ["synthesize-mhd", "--input", str(path), "--preset", "beavertails-fdc", "--n", "12", "--seed", "7"]
    assert cli(args + ["--output", str(tmp_path / "a.jsonl")]) == 0
    assert cli(args + ["--output", str(tmp_path / "b.jsonl")]) == 0
    a = _read(tmp_path / "a.jsonl")
    assert a == _read(tmp_path / "b.jsonl") and len(a) == 12 and {r["group"] for r in a} == {"MHD"}
    assert "433 EHD x 1550 IHD" in capsys.readouterr().out
    assert cli(["synthesize-mhd", "--input", str(shared_data / "xstest" / "xstest_prompts.csv"), "--preset", "xstest",
                "--n", "3", "--output", str(tmp_path / "c.jsonl")]) == 1

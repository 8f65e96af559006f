"""Every user error at the command line ends in one line naming file, row and field, and a non-zero
exit; no traceback (issue 12, item 8)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from equilibrate_pl.cli import main as cli
from tests.recipes import DPO_TINY_FROM_BASE

REPO = Path(__file__).resolve().parents[1]


def _categorize(path: Path | str, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    code = cli(["categorize", "--input", str(path), "--method", "labels", "--output", str(Path(str(path)).parent / "out.jsonl"), *extra])
    return code, capsys.readouterr().err


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


def test_categorize_input_is_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "prompts").mkdir()
    code, err = _categorize(tmp_path / "prompts", capsys)
    assert code != 0 and "a directory, not a file" in _one_line(err)


def test_categorize_input_without_extension_that_does_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    code, err = _categorize("data/prompts", capsys)
    assert code != 0 and "data/prompts: file not found" in _one_line(err)
    code, err = _categorize("prompts", capsys)  # could be a hub id: tried offline, reported in one line
    assert code != 0 and "hub dataset failed" in _one_line(err)


def test_categorize_csv_field_over_131072_chars(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "big.csv"
    path.write_text("prompt,group\n" + "x" * 140_000 + ",EHD\n")
    code, err = _categorize(path, capsys)
    assert code != 0 and "big.csv, row 1, field 'prompt': 140000 characters" in _one_line(err)
    code, err = _categorize(path, capsys, "--max-chars", "200000")
    assert code == 0, err


def test_categorize_utf16_and_duplicated_header(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "u16.csv"
    path.write_bytes("prompt,group\nhello,EHD\n".encode("utf-16"))
    code, err = _categorize(path, capsys)
    assert code != 0 and "encoded as UTF-16-LE" in _one_line(err)
    path = tmp_path / "dup.csv"
    path.write_text("prompt,prompt,group\nA,B,EHD\n")
    code, err = _categorize(path, capsys)
    assert code != 0 and "dup.csv, field 'prompt': appears twice in the header" in _one_line(err)


def test_world_output_is_a_file_and_argument_errors_go_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "o.jsonl"
    target.write_text("mine")
    capsys.readouterr()
    assert cli(["world", "--size", "tiny", "--output", str(target)]) == 2
    out, err = capsys.readouterr()
    assert "exists and is not a directory" in _one_line(err) and target.read_text() == "mine"
    assert cli(["world", "--noise-fraction", "5"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "noise_fraction" in _one_line(err)


def test_dpo_fit_data_error_is_one_line_without_traceback(tmp_path: Path, equilibrate_cache: Path) -> None:
    (tmp_path / "general.jsonl").write_text("".join(f'{{"prompt": "q{i}", "chosen": "a", "rejected": "b"}}\n' for i in range(8)))
    (tmp_path / "safety.jsonl").write_text('{"prompt": "q", "chosen": "no", "group": "EHD"}\n')
    env = {**os.environ, "EQUILIBRATE_CACHE": str(equilibrate_cache), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    run = subprocess.run(
        [sys.executable, "-m", "equilibrate_pl.cli", "dpo", "fit", "--config", str(REPO / "configs" / "dpo" / "tiny.yaml"), *DPO_TINY_FROM_BASE,
         "--trainer.max_steps", "1", "--data.general", "[{path: general.jsonl}]", "--data.safety", "[{path: safety.jsonl}]"],
        cwd=tmp_path, env=env, text=True, capture_output=True, timeout=600)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("equilibrate dpo: safety.jsonl, row 1, field 'rejected': missing")
    version_dirs = list((tmp_path / "runs" / "dpo" / "logs").glob("version_*")) if (tmp_path / "runs").exists() else []
    assert not version_dirs  # a failed run leaves no empty log version behind


def test_dpo_fit_settings_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], equilibrate_cache: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    code = cli(["dpo", "fit", "--config", str(REPO / "configs" / "dpo" / "tiny.yaml"), *DPO_TINY_FROM_BASE, "--model.init_args.beta", "-1"])
    assert code == 2
    assert "beta must be positive" in capsys.readouterr().err.strip().splitlines()[-1]

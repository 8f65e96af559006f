"""`equilibrate eval` keeps what it has done (issue 12, item 5): arguments checked before any
generation, each model's rows and metrics on disk as soon as it finishes, an interrupted run resumed
from disk, degenerate generations called out, and only valid JSON written (item 9)."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from equilibrate_pl.cli import main as cli


def _strict_json(text: str) -> object:
    def no_constants(name: str) -> None:
        raise ValueError(f"not JSON: bare {name}")

    return json.loads(text, parse_constant=no_constants)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, equilibrate_cache: Path) -> Path:
    from equilibrate_pl.data.tokenizer import tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    path = tmp_path_factory.mktemp("tiny_lm")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_every_model_path_is_checked_before_generating(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import equilibrate_pl.eval.generation as generation

    def no_generation(*args, **kwargs):
        raise AssertionError("generated before the arguments were checked")

    monkeypatch.setattr(generation, "generate", no_generation)
    out = tmp_path / "out"
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    for bad, why in ((str(tmp_path / "runs" / "sft" / "hf"), "no such model directory"),
                     ("runs/sft/hf", "no such model directory"),
                     (str(tmp_path), "holds no config.json"),
                     ("builtin:huge", "unknown built-in model"),
                     ("someone/not-cached-model", "not in the local Hugging Face cache")):
        capsys.readouterr()
        code = cli(["eval", "--model", f"ok={tiny_dir}", "--model", f"bad={bad}", "--output", str(out), "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and why in err[0] and "bad" in err[0], (bad, err)
        assert not (out / "results.jsonl").exists()
    target = tmp_path / "a_file"
    target.write_text("x")
    assert cli(["eval", "--model", str(tiny_dir), "--output", str(target), "--no-progress"]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_an_interrupted_eval_keeps_finished_models_and_resumes(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import equilibrate_pl.eval.generation as generation

    real = generation.generate
    calls: list[str] = []
    args = ["eval", "--model", "first=builtin:tiny", "--model", f"second={tiny_dir}", "--suite", "builtin", "--limit", "6",
            "--max-new-tokens", "4", "--output", str(tmp_path / "out"), "--no-progress"]

    def interrupted(*a, **kw):
        calls.append(kw["desc"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second model generates
        return real(*a, **kw)

    monkeypatch.setattr(generation, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli(args)
    out = tmp_path / "out"
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["model"] for r in rows} == {"first"}  # the finished model is on disk
    done = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [d["model"] for d in done] == ["first"] and "safety_rate" in done[0]["metrics"]

    calls.clear()
    monkeypatch.setattr(generation, "generate", lambda *a, **kw: calls.append(kw["desc"]) or real(*a, **kw))
    assert cli(args) == 0
    assert calls == ["generating (second)"]  # the first model was read back, not generated again
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["model"] for r in rows] == ["first"] * 6 + ["second"] * 6
    resumed = _strict_json((out / "metrics.json").read_text())

    calls.clear()
    straight = [*args[:-2], str(tmp_path / "straight"), "--no-progress"]
    assert cli(straight) == 0
    assert _strict_json((tmp_path / "straight" / "metrics.json").read_text())["models"] == resumed["models"]


def test_changed_settings_do_not_resume(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["eval", "--model", str(tiny_dir), "--limit", "3", "--max-new-tokens", "3", "--output", str(tmp_path / "o"), "--no-progress"]
    assert cli(base) == 0
    capsys.readouterr()
    assert cli([*base, "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0] and "seed" in err[0]


def test_degenerate_generations_are_warned_about_and_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture, equilibrate_cache: Path) -> None:
    import equilibrate_pl.eval.generation as generation
    from equilibrate_pl.eval.report import evaluate_models, response_health
    from equilibrate_pl.eval.suites import load_suite

    assert response_health(["", "  ", "a a a a a", "aaaaaaaaaa", "No, I can't help with that.", "the the cat"]) == {
        "empty": 2, "repetitive": 2}
    suite = load_suite("builtin").limit(8)
    canned = {"mute": [""] * 8, "stuck": ["a a a a a a"] * 7 + ["I cannot help with that."], "fine": ["I cannot help with that."] * 8}
    monkeypatch.setattr(generation, "generate", lambda model, *a, **kw: canned[model])
    with caplog.at_level(logging.WARNING):
        result = evaluate_models({name: (name, None) for name in canned}, suite, progress=False)
    assert result.models["mute"].responses == {"empty": 8, "repetitive": 0}
    assert result.models["stuck"].responses == {"empty": 0, "repetitive": 7}
    warned = [r.getMessage() for r in caplog.records]
    assert any("mute: 8 of 8 generations are empty" in m for m in warned)
    assert any("stuck: 7 of 8 generations repeat one token" in m for m in warned)
    assert not any("fine:" in m for m in warned)
    paths = result.write(tmp_path / "r")
    assert "8 of 8 empty" in paths["report"].read_text()
    assert _strict_json(paths["metrics"].read_text())["models"]["stuck"]["responses"] == {"empty": 0, "repetitive": 7}


def test_report_files_are_valid_json_and_honour_the_umask(tmp_path: Path) -> None:
    from equilibrate_pl.eval.report import EvalResult, ModelResult

    rows = [{"id": "1", "prompt": "p", "group": "EHD", "harmful": False, "response": "r", "refused": False,
             "verdict": {"safe": True, "score": 1.0, "label": "safe", "raw": None}, "helpfulness": math.nan}]
    result = EvalResult("s", "refusal", {"m": ModelResult("m", rows, {"safety_rate": math.nan, "over_refusal_rate": 0.0,
                                                                         "helpfulness": math.inf}, {"harmful": 0, "benign": 1})})
    paths = result.write(tmp_path)
    for name in ("results", "metrics"):
        text = paths[name].read_text()
        for line in (text.splitlines() if name == "results" else [text]):
            _strict_json(line)
    assert _strict_json(paths["results"].read_text())["helpfulness"] is None
    umask = os.umask(0o022)
    os.umask(umask)
    for path in paths.values():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path

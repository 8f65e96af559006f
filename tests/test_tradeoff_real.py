"""benchmarks/tradeoff_real.py: the pipeline end to end at smoke size, and its pieces.

The smoke run uses the tiny built-in model and a few rows of the real files in ../shared/data
(hh-rlhf pairs, XSTest); the SmolLM2 run is marked slow.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from benchmarks import tradeoff_real as tr


def _args(**kw: object) -> argparse.Namespace:
    return argparse.Namespace(**{"fdc_safety": 48, **kw})


def test_fdc_quotas_keep_the_paper_proportions() -> None:
    # 1/25 : 1/75 : 1/150 = 6 : 2 : 1. 48 -> 32, 10.67, 5.33: floors 32/10/5, the largest remainder (IHD) gets the last one.
    assert tr.fdc_quotas(48) == {"EHD": 32, "IHD": 11, "MHD": 5}
    assert tr.fdc_quotas(9) == {"EHD": 6, "IHD": 2, "MHD": 1}
    for total in range(0, 40):
        assert sum(tr.fdc_quotas(total).values()) == total


def test_arm_data_and_names() -> None:
    assert tr.arm_data("fdc", _args()) == {"mix": "quota", "quotas": {"EHD": 32, "IHD": 11, "MHD": 5}}
    assert tr.arm_data("naive-4x", _args()) == {"mix": "all", "draw": 192}
    assert tr.arm_data("naive-2.5x", _args(fdc_safety=10)) == {"mix": "all", "draw": 25}
    for bad in ("naive", "naive-x", "naive-0x", "sorted"):
        with pytest.raises(ValueError, match="unknown data arm"):
            tr.arm_data(bad, _args())
    assert tr.parse_arm("fdc/adpo") == ("fdc", "adpo")
    with pytest.raises(ValueError, match="dpo"):
        tr.parse_arm("fdc/ppo")


def _recomputed(rows: list[dict]) -> dict[str, float]:
    """The three headline metrics from the kept generations, written out independently of eval.metrics."""
    harmful = [r["refused"] for r in rows if r["harmful"]]
    benign = [r["refused"] for r in rows if not r["harmful"]]
    safety = sum(harmful) / len(harmful)
    over = sum(benign) / len(benign)
    helpful_share = 1 - over
    balance = 0.0 if safety + helpful_share == 0 else 2 * safety * helpful_share / (safety + helpful_share)
    return {"safety_rate": safety, "over_refusal_rate": over, "balance": balance}


def test_smoke_run_writes_results_and_resumes(tmp_path: Path, shared_data: Path, equilibrate_cache: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--smoke", "--workdir", str(work), "--out", str(out), "--arms", "before", "naive-2x/dpo", "fdc/adpo",
            "--hh", str(shared_data / "hh-rlhf" / "harmless-base-test.jsonl.gz"),
            "--xstest", str(shared_data / "xstest" / "xstest_prompts.csv")]
    tr.main(argv)
    summary = json.loads((out / "tradeoff-real.json").read_text())
    assert summary["complete"] and list(summary["models"]) == ["before", "naive-2x/dpo", "fdc/adpo"]
    assert summary["pool"]["skipped_rows"] == 9  # the malformed rows of harmless-base-test, counted not dropped silently
    assert summary["pool"]["pairs"] == tr.SMOKE["hh_limit"]
    assert sum(summary["pool"]["groups"].values()) == tr.SMOKE["hh_limit"]

    general, fdc_safety = tr.SMOKE["general"], tr.SMOKE["fdc_safety"]
    naive, fdc = summary["arms"]["naive-2x/dpo"], summary["arms"]["fdc/adpo"]
    assert naive["pairs"] == general + 2 * fdc_safety
    assert naive["steps"] == math.ceil(naive["pairs"] / tr.SMOKE["batch_size"])
    # The FDC arm: the same general rows plus exactly the per-group quotas (the pool has enough of each).
    expected = {g: n for g, n in tr.fdc_quotas(fdc_safety).items() if n}
    assert {g: n for g, n in fdc["groups"].items() if g != "general"} == expected
    assert fdc["groups"]["general"] == general and fdc["pairs"] == general + fdc_safety

    generations = [json.loads(line) for line in (out / "tradeoff-real-generations.jsonl").read_text().splitlines()]
    assert len(generations) == 3 * tr.SMOKE["eval_limit"]
    for name, ev in summary["models"].items():
        rows = [g for g in generations if g["model"] == name]
        assert ev["counts"] == {"harmful": sum(r["harmful"] for r in rows), "benign": sum(not r["harmful"] for r in rows)}
        for key, value in _recomputed(rows).items():
            assert ev["metrics"][key] == pytest.approx(value)
        by_type = {t: v["n"] for t, v in ev["refusal_rate_by_type"].items()}
        assert sum(by_type.values()) == len(rows) and "?" not in by_type
    assert (out / "tradeoff-real.png").stat().st_size > 0
    assert "| fdc/adpo |" in (out / "tradeoff-real.md").read_text()

    # A rerun with the same settings reuses every finished arm and evaluation: nothing is retrained.
    capsys.readouterr()
    tr.main(argv)
    log = capsys.readouterr().err
    assert "trained in" not in log and log.count("reusing") == 1 + 2 + 3  # pool, 2 arms, 3 evaluations
    # A changed training setting retrains (and re-evaluates) the arms, not the start model.
    capsys.readouterr()
    tr.main([*argv, "--lr", "1e-4", "--arms", "before", "fdc/adpo"])
    log = capsys.readouterr().err
    assert "fdc/adpo: trained in" in log and "eval before: reusing" in log and "eval fdc/adpo: reusing" not in log


@pytest.mark.slow
def test_smollm2_pipeline_small(tmp_path: Path, shared_data: Path) -> None:
    """The real model and the classifier categorizer, at a size of minutes."""
    summary = tr.main(["--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--hh-limit", "400",
                       "--general", "8", "--fdc-safety", "8", "--eval-limit", "16", "--max-new-tokens", "16",
                       "--arms", "before", "naive-2x/dpo", "fdc/adpo"])
    assert summary["complete"] and summary["pool"]["categorizer"]["method"] == "classifier"
    for ev in summary["models"].values():
        assert 0.0 <= ev["metrics"]["safety_rate"] <= 1.0 and 0.0 <= ev["metrics"]["over_refusal_rate"] <= 1.0

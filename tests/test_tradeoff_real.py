"""benchmarks/tradeoff_real.py: its pieces by hand, XSTest kept out of training, and the pipeline
end to end at smoke size (the tiny built-in model; the real SmolLM2 run takes hours)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from benchmarks import tradeoff_real as tr


def test_quotas_keep_the_paper_proportions() -> None:
    # 10 : 3 : 1 of 150 = 107.1, 32.1, 10.7: floors 107 / 32 / 10, the largest remainder (MHD) gets the last pair.
    assert tr.quotas(150) == {"EHD": 107, "IHD": 32, "MHD": 11}
    assert tr.quotas(14) == {"EHD": 10, "IHD": 3, "MHD": 1}
    assert all(sum(tr.quotas(n).values()) == n for n in range(60))


def _args(tmp_path: Path, **kw: object) -> argparse.Namespace:
    base = {"bt_train": 300, "general_train": 120, "dev": 20, "data_seed": 0, "smoke": True}
    return argparse.Namespace(**{**base, **kw})


def test_no_training_prompt_is_an_xstest_prompt(shared_data: Path, tmp_path: Path, equilibrate_cache: Path) -> None:
    """Every prompt file the pairs are built from, compared with XSTest's 450 prompts as written."""
    import csv

    xstest = shared_data / "xstest" / "xstest_prompts.csv"
    shared_data / "beavertails-fdc" / "beavertails_selected_relabelled.json"  # skip when missing
    held_out = {" ".join(r["prompt"].lower().split()) for r in csv.DictReader(open(xstest, encoding="utf-8"))}
    assert len(held_out) == 450
    counts = tr.build_prompts(_args(tmp_path), tmp_path, lambda msg: None)
    assert counts["xstest_prompts_held_out"] == 450
    for name in ("fdc", "naive", "general", "fdc-dev", "general-dev"):
        rows = [json.loads(line) for line in (tmp_path / "prompts" / f"{name}.jsonl").open()]
        assert rows and not {" ".join(str(r["prompt"]).lower().split()) for r in rows} & held_out, name
    fdc = [json.loads(line) for line in (tmp_path / "prompts" / "fdc.jsonl").open()]
    naive = [json.loads(line) for line in (tmp_path / "prompts" / "naive.jsonl").open()]
    assert {r["group"] for r in fdc} <= {"EHD", "IHD", "MHD"}  # "No risk" and "OTHER" stay out of the FDC pool
    assert {r["meta"]["label"] for r in naive} > {"EHD", "IHD", "MHD"}  # the naive pool keeps them
    dev = {r["prompt"] for name in ("fdc-dev", "general-dev") for r in map(json.loads, (tmp_path / "prompts" / f"{name}.jsonl").open())}
    assert not dev & {r["prompt"] for r in naive + fdc}  # dev prompts are never trained on


def test_smoke_run_end_to_end(shared_data: Path, tmp_path: Path, equilibrate_cache: Path) -> None:
    shared_data / "beavertails-fdc" / "beavertails_selected_relabelled.json"  # skip when missing
    shared_data / "xstest" / "xstest_prompts.csv"
    out = tmp_path / "out"
    argv = ["--smoke", "--model", "builtin:tiny", "--draws", "0", "--bt-train", "30", "--general-train", "16", "--dev", "8",
            "--sample-tokens", "6", "--fdc-pairs", "14", "--steps", "2", "--rm-steps", "2", "--eval-tokens", "4",
            "--eval-limit", "12", "--workdir", str(tmp_path / "work"), "--out", str(out)]
    summary = tr.main(argv)
    saved = json.loads((out / "tradeoff-real.json").read_text())
    assert saved["draws"] == ["0"] and set(saved["aggregate"]) == {tr.START, *tr.ARMS}
    for arm in tr.ARMS:
        assert set(saved["per_draw"]["0"][arm]) >= {"safety_rate", "over_refusal_rate", "safety_minus_over_refusal", "pairs"}
    adpo, naive = saved["per_draw"]["0"]["fdc/adpo"]["pairs"], saved["per_draw"]["0"]["naive/dpo"]["pairs"]
    assert sum(v for k, v in adpo.items() if k != "general") <= 14  # the FDC quota
    assert set(saved["reward_model"]) >= {"refusal_over_compliance_on_harmful", "helpful_over_refusal_on_benign"}
    assert set(saved["goals"]) == {"refuses_at_least_half_of_unsafe", "refuses_at_most_10pct_of_safe",
                                   "safety_minus_over_refusal_above_every_naive_arm", "draws_at_least_3"}
    assert naive and summary["per_draw"] == saved["per_draw"]
    # a second call with the same settings trains and samples nothing
    again = tr.main(argv)
    assert again["per_draw"] == saved["per_draw"]

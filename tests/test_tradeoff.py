"""benchmarks/tradeoff.py: the statistics by hand, and the experiment end to end at smoke size."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import tradeoff as tr


def test_summarize_is_a_95_percent_t_interval() -> None:
    s = tr.summarize([1.0, 2.0, 3.0])
    # mean 2, sample std 1, t(0.975, 2) = 4.302653 -> half-width 4.302653 / sqrt(3)
    assert s["mean"] == 2.0 and s["std"] == 1.0 and s["values"] == [1.0, 2.0, 3.0] and s["n"] == 3
    assert s["ci95"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert (s["low"], s["high"]) == pytest.approx((2 - s["ci95"], 2 + s["ci95"]))
    assert math.isnan(tr.summarize([0.5])["ci95"])  # one value: no interval


def test_goal_checks_by_hand() -> None:
    per_seed = {
        0: {tr.FDC_ARM: {"safety_rate": 0.86, "over_refusal_rate": 0.10, "balance": 0.88},
            tr.NAIVE_ARM: {"safety_rate": 0.90, "over_refusal_rate": 0.30, "balance": 0.78}},
        1: {tr.FDC_ARM: {"safety_rate": 0.84, "over_refusal_rate": 0.12, "balance": 0.70},
            tr.NAIVE_ARM: {"safety_rate": 0.92, "over_refusal_rate": 0.30, "balance": 0.80}},
    }
    checks = tr.goal_checks(per_seed, {tr.FDC_ARM: 380, tr.NAIVE_ARM: 1140})
    assert checks["safety_within_0.05"]["met"] is False  # 0.85 vs 0.91
    assert checks["over_refusal_at_most_half"]["met"] is True  # 0.11 vs 0.30
    assert checks["higher_balance_every_seed"]["met"] is False  # seed 1: 0.70 < 0.80
    assert checks["safety_pairs_at_most_a_third"]["met"] is True and checks["seeds_at_least_5"]["met"] is False


def test_smoke_run_writes_per_seed_values_and_intervals(tmp_path: Path, equilibrate_cache: Path) -> None:
    arms = [tr.NAIVE_ARM, "fdc-oracle/adpo"]  # the oracle needs no MiniLM classifier: seconds, not minutes
    summary = tr.main(["--reduced", "--seeds", "0", "1", "--arms", *arms, "--eval-limit", "16",
                       "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out" / "tradeoff.json").read_text())
    assert saved["seeds"] == [0, 1] and set(saved["aggregate"]) == {tr.START, *arms}
    for arm in arms:
        safety = saved["aggregate"][arm]["safety_rate"]
        assert len(safety["values"]) == 2 and safety["mean"] == pytest.approx(sum(safety["values"]) / 2)
        assert set(saved["per_seed"]["0"][arm]) >= {"safety_rate", "over_refusal_rate", "balance", "task_success"}
    assert saved["pairs"][tr.NAIVE_ARM] > 0 and saved["pairs"]["fdc-oracle/adpo"] > 0
    assert (tmp_path / "out" / "tradeoff.png").stat().st_size > 1000
    assert "| model | safety pairs |" in (tmp_path / "out" / "tradeoff.md").read_text()
    # a second call reuses the finished stages and seeds
    again = tr.main(["--reduced", "--seeds", "0", "1", "--arms", *arms, "--eval-limit", "16",
                     "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out2")])
    from equilibrate_pl.files import dumps_json

    assert dumps_json(again["per_seed"]) == dumps_json(summary["per_seed"])  # NaN == NaN as null

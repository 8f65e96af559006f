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
    # an arm added later trains alone; the seeds keep the arms they finished
    more = tr.main(["--reduced", "--seeds", "0", "--arms", *arms, "naive-10x/ppo-lagrangian", "--eval-limit", "16",
                    "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out3")])
    assert dumps_json(more["per_seed"]["0"][tr.NAIVE_ARM]) == dumps_json(summary["per_seed"]["0"][tr.NAIVE_ARM])
    curve = more["curves"]["0"]["naive-10x/ppo-lagrangian"]
    assert curve["lagrangian/lambda"] and len(curve["step"]) == len(curve["lagrangian/window_cost"])
    assert more["per_seed"]["0"]["naive-10x/ppo-lagrangian"]["final_lambda"] == curve["lagrangian/lambda"][-1]
    assert (tmp_path / "out3" / "tradeoff-lagrangian.png").stat().st_size > 1000
    assert "naive-10x/ppo-lagrangian: cost_within_threshold_every_seed" in (tmp_path / "out3" / "tradeoff.md").read_text()


def test_ppo_goal_checks_by_hand() -> None:
    lag, appo_lag = "naive-10x/ppo-lagrangian", "fdc-classifier/appo-lagrangian"
    arm = lambda s, o, b, **kw: {"safety_rate": s, "over_refusal_rate": o, "balance": b, **kw}  # noqa: E731
    per_seed = {
        0: {tr.NAIVE_ARM: arm(0.9, 0.40, 0.7), "naive-10x/ppo": arm(0.5, 0.0, 0.6), "fdc-classifier/appo": arm(0.7, 0.1, 0.8),
            lag: arm(0.8, 0.5, 0.6, final_window_cost=-8.5), appo_lag: arm(0.8, 0.1, 0.85, final_window_cost=-8.1)},
        1: {tr.NAIVE_ARM: arm(0.9, 0.20, 0.8), "naive-10x/ppo": arm(0.7, 0.0, 0.8), "fdc-classifier/appo": arm(0.7, 0.1, 0.8),
            lag: arm(0.8, 0.5, 0.6, final_window_cost=-7.9), appo_lag: arm(0.8, 0.1, 0.85, final_window_cost=-8.0)},
    }
    checks = tr.ppo_goal_checks(per_seed, {"safety_rate": 0.65}, {lag: -8.0, appo_lag: -8.0})
    # naive-10x/ppo's mean safety 0.6 < the start's 0.65
    assert checks["no_arm_less_safe_than_start"]["met"] is False
    assert checks[f"{lag}: cost_within_threshold_every_seed"]["met"] is False  # seed 1: -7.9 > -8.0
    assert checks[f"{appo_lag}: cost_within_threshold_every_seed"]["met"] is True  # -8.1, -8.0 (at the threshold)
    assert checks[f"{lag}: over_refusal_at_most_naive_dpo"]["met"] is False  # 0.5 > 0.3
    assert checks[f"{appo_lag}: over_refusal_at_most_naive_dpo"]["met"] is True
    assert checks["appo_lagrangian_best_balance"]["met"] is True  # 0.85 vs 0.8, 0.7, 0.6


def test_training_curves_read_the_newest_version_rows_that_log_every_key(tmp_path: Path) -> None:
    for version, lam in ((0, "9"), (1, "1.5")):
        folder = tmp_path / f"version_{version}"
        folder.mkdir()
        (folder / "metrics.csv").write_text(
            "step,lagrangian/lambda,lagrangian/window_cost,loss\n"
            f"0,{lam},-7.5,\n1,,,0.3\n2,2.0,-8.25,\n")
    curves = tr.training_curves(tmp_path, ("lagrangian/lambda", "lagrangian/window_cost"))
    assert curves == {"step": [0.0, 2.0], "lagrangian/lambda": [1.5, 2.0], "lagrangian/window_cost": [-7.5, -8.25]}
    with pytest.raises(FileNotFoundError, match="no CSVLogger"):
        tr.training_curves(tmp_path / "missing", ("cost/mean",))

"""`python -m benchmarks.run --smoke` runs end to end and writes the documented JSON (never timed)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _finite_positive(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_benchmark_smoke_writes_valid_json(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "latest.json").read_text())
    assert not list(tmp_path.glob(".*.tmp*")), "atomic write left a temp file"
    assert result["mode"] == "smoke"
    for key in ("machine", "settings", "matmul_peak", "rows", "phases", "mfu", "memory_method", "timing_method"):
        assert key in result, key
    assert result["machine"]["trl"] and len(result["machine"]["loadavg_start"]) == 3
    names = {row["name"] for row in result["rows"]}
    assert {"preference/dpo", "policy/grpo"} <= names
    for row in result["rows"]:
        for side in ("ours", "peer"):
            res = row[side]
            for key in ("samples_per_s", "tokens_per_s", "samples_per_cpu_s", "tokens_per_cpu_s", "median_step_s"):
                assert _finite_positive(res[key]), (row["name"], side, key, res.get(key))
            assert "peak_rss_mb" in res
        # ours/peer ratio is exactly the quotient of the two reported throughputs
        assert math.isclose(row["ratio"]["samples_per_s"], row["ours"]["samples_per_s"] / row["peer"]["samples_per_s"])
        assert row["ours"]["tokens_per_step"] > 0
    # the same rows fed to both sides: equal mean tokens per preference step (same tokenization)
    dpo = next(r for r in result["rows"] if r["name"] == "preference/dpo")
    assert dpo["ours"]["tokens_per_step"] == dpo["peer"]["tokens_per_step"]
    phases = {row["name"]: row["ours"] for row in result["phases"]}
    for mode in ("policy/ppo", "policy/appo"):
        for key in ("generation_s", "scoring_s", "update_s"):
            assert _finite_positive(phases[mode][key]), (mode, key)
    for row in result["mfu"]:
        assert 0 < row["mfu"] and row["params"] > 0
    md = (tmp_path / "latest.md").read_text()
    assert "| preference/dpo |" in md and "MFU" in md


def test_switch_ab_runs_both_sides(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.switches", "rm.share_prompt", "--reps", "1", "--batch", "2", "--steps", "2", "--warmup", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "rm.share_prompt on (True)" in proc.stderr and "rm.share_prompt off (False)" in proc.stderr
    assert "| rm.share_prompt (True, False) |" in proc.stdout

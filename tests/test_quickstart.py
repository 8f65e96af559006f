"""`equilibrate quickstart --reduced` end to end: every stage runs and the report is complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from equilibrate_pl.quickstart import ARMS, QuickstartSettings, format_table, verdict


def test_quickstart_cli_reduced_writes_metrics_and_report(tmp_path: Path, equilibrate_cache: Path) -> None:
    out = tmp_path / "qs"
    env = {**os.environ, "EQUILIBRATE_CACHE": str(equilibrate_cache)}
    proc = subprocess.run(
        [sys.executable, "-m", "equilibrate_pl.cli", "quickstart", "--reduced", "--output", str(out)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((out / "metrics.json").read_text())
    assert set(payload["metrics"]) == {"before (SFT)", *ARMS}
    for name, metrics in payload["metrics"].items():
        for key in ("safety_rate", "over_refusal_rate", "balance", "helpfulness"):
            value = metrics[key]
            assert value is not None and (key == "helpfulness" or 0.0 <= value <= 1.0), (name, key, value)
    assert set(payload["seconds"]) >= {"sft", "reward model", "evaluation", *ARMS}
    report = out / "report"
    assert (report / "report.md").read_text().count("|") > 10
    assert (report / "tradeoff.png").stat().st_size > 1000
    rows = [json.loads(line) for line in (report / "results.jsonl").read_text().splitlines()]
    assert {r["model"] for r in rows} == {"before (SFT)", *ARMS}
    # every model answered every evaluated prompt
    assert len(rows) == 5 * len({r["id"] for r in rows})
    # the printed table and verdict are in the output
    assert "| naive-dpo |" in proc.stdout and "on balance" in proc.stdout
    for arm in ARMS:
        assert (out / arm / "config.json").exists()


def test_table_and_verdict_report_honestly() -> None:
    metrics = {
        "naive-dpo": {"safety_rate": 0.9, "over_refusal_rate": 0.5, "balance": 0.643},
        "fdc-adpo": {"safety_rate": 0.8, "over_refusal_rate": 0.6, "balance": 0.533},
    }
    table = format_table(metrics)
    assert "| fdc-adpo | 0.800 | - | - | - | 0.600 | - | 0.533 |" in table
    # the FDC arm is worse here, and the verdict must say so rather than hide it
    assert "fdc-adpo does NOT beat naive-dpo" in verdict(metrics)


def test_unknown_arm_is_rejected() -> None:
    import pytest

    with pytest.raises(ValueError, match="unknown arm"):
        QuickstartSettings(arms=("naive-dpo", "magic"))

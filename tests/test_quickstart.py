"""`equilibrate quickstart --reduced` end to end: every stage runs and the report is complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from equilibrate_pl.quickstart import ARMS, STAGES, QuickstartSettings, format_table, recipe_dir, recipe_overrides, verdict

REPO = Path(__file__).resolve().parents[1]


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
    assert set(payload["seconds"]) >= {*STAGES, "evaluation", *ARMS}
    report = out / "report"
    assert (report / "report.md").read_text().count("|") > 10
    assert (report / "tradeoff.png").stat().st_size > 1000
    rows = [json.loads(line) for line in (report / "results.jsonl").read_text().splitlines()]
    assert {r["model"] for r in rows} == {"before (SFT)", *ARMS}
    # every model answered every evaluated prompt
    assert len(rows) == (1 + len(ARMS)) * len({r["id"] for r in rows})
    # the printed table and verdict are in the output, with progress lines inside each stage
    assert "| naive-dpo |" in proc.stdout and "on balance" in proc.stdout
    assert "[quickstart] sft: step 8/8" in proc.stdout
    for arm in ARMS:
        assert (out / arm / "config.json").exists()
        # each arm ran its recipe: LightningCLI saved the resolved config next to its logs
        saved = yaml.safe_load(next((out / "logs" / arm).glob("version_*/config.yaml")).read_text())
        recipe = yaml.safe_load((recipe_dir() / f"{arm}.yaml").read_text())
        assert saved["data"]["mix"] == recipe["data"]["mix"]
        assert saved["model"]["class_path"] == recipe["model"]["class_path"]
    # nothing alarming on the way (transformers' load report, Lightning's adverts)
    for noise in ("LOAD REPORT", "Tip:", "Traceback"):
        assert noise not in proc.stdout + proc.stderr


def test_every_quickstart_recipe_is_a_stage_or_an_arm() -> None:
    """Adding an arm is a YAML file plus one line in ARMS: no recipe without its line, no line without its file."""
    assert sorted(p.stem for p in recipe_dir().glob("*.yaml")) == sorted([*STAGES, *ARMS])
    assert recipe_dir() == REPO / "configs" / "quickstart"


def test_run_settings_become_command_line_overrides() -> None:
    recipe = yaml.safe_load((recipe_dir() / "naive-ppo.yaml").read_text())
    # the recipes as written: only the quickstart's own progress lines replace the bar
    assert recipe_overrides(recipe, QuickstartSettings(), "naive-ppo") == ["--trainer.enable_progress_bar", "false"]
    options = recipe_overrides(recipe, QuickstartSettings(output_dir="elsewhere", seed=5, reduced=True,
                                                          overrides={"*": ["--a", "1"], "naive-ppo": ["--b", "2"]}), "naive-ppo")
    pairs = dict(zip(options[::2], options[1::2]))
    assert pairs["--seed_everything"] == str(recipe["seed_everything"] + 5)  # every seed shifts by --seed
    assert pairs["--data.seed"] == "5" and pairs["--model.init_args.seed"] == "5"
    assert pairs["--model.init_args.actor.name_or_path"] == "elsewhere/sft"  # runs/quickstart/... moves
    assert pairs["--model.init_args.reward_model.name_or_path"] == "elsewhere/rm-naive"
    assert pairs["--trainer.logger.init_args.save_dir"] == "elsewhere/logs"
    assert pairs["--trainer.max_steps"] == "1" and pairs["--data.batch_size"] == "4"  # reduced
    assert pairs["--model.init_args.generation.max_new_tokens"] == "8"
    assert options[-4:] == ["--a", "1", "--b", "2"]  # explicit overrides come last and win
    with pytest.raises(ValueError, match="overrides for unknown recipe"):
        QuickstartSettings(overrides={"naive-dop": []})


def test_table_and_verdict_report_honestly() -> None:
    metrics = {
        "naive-dpo": {"safety_rate": 0.9, "over_refusal_rate": 0.5, "balance": 0.643},
        "fdc-adpo": {"safety_rate": 0.8, "over_refusal_rate": 0.6, "balance": 0.533},
    }
    table = format_table(metrics)
    assert "| fdc-adpo | 0.800 | - | - | - | 0.600 | - | - | 0.533 |" in table  # no helpfulness or task success given
    # the FDC arm is worse here, and the verdict must say so rather than hide it
    assert "fdc-adpo does NOT beat naive-dpo" in verdict(metrics)


def test_unknown_arm_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown arm"):
        QuickstartSettings(arms=("naive-dpo", "magic"))

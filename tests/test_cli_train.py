"""`equilibrate sft|rm|cost|dpo|ppo` end to end in a subprocess: a run, --print_config, unknown keys, export."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.recipes import DPO_TINY_FROM_BASE

REPO = Path(__file__).resolve().parents[1]


def _equilibrate(args: list[str], cwd: Path, cache: Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EQUILIBRATE_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "equilibrate_pl.cli", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout)


def test_dpo_fit_from_the_tiny_config_then_export(tmp_path: Path, equilibrate_cache: Path) -> None:
    config = REPO / "configs" / "dpo" / "tiny.yaml"
    run = _equilibrate(["dpo", "fit", "--config", str(config), "--trainer.max_steps", "2",
                        "--trainer.val_check_interval", "2", *DPO_TINY_FROM_BASE],
                       tmp_path, equilibrate_cache)
    assert run.returncode == 0, run.stderr[-3000:]
    # the end of `fit` says where the checkpoint is and how to export it
    assert "checkpoint: runs/dpo/checkpoints/last.ckpt" in run.stdout
    assert "equilibrate export --ckpt runs/dpo/checkpoints/last.ckpt --output runs/dpo/export" in run.stdout
    ckpt = tmp_path / "runs" / "dpo" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert state["global_step"] == 2
    assert state["equilibrate_module"] == "equilibrate_pl.modules.preference.PreferenceModule"
    assert any("RNGStateCallback" in k for k in state["callbacks"])
    assert not any(k.startswith("reference.") for k in state["state_dict"])  # frozen copy not stored
    assert (tmp_path / "runs" / "dpo" / "reference_cache").is_dir()  # precompute_reference: true

    out = tmp_path / "export"
    run = _equilibrate(["export", "--ckpt", str(ckpt), "--output", str(out)], tmp_path, equilibrate_cache)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    from equilibrate_pl.models import load_causal_lm

    model, _ = load_causal_lm(str(out))
    trained = {k.removeprefix("model."): v for k, v in state["state_dict"].items() if k.startswith("model.")}
    torch.testing.assert_close(model.state_dict()["model.embed_tokens.weight"], trained["model.embed_tokens.weight"])


def test_cost_model_then_ppo_lagrangian_from_the_tiny_configs(tmp_path: Path, equilibrate_cache: Path) -> None:
    """`equilibrate cost fit` (safety labels from the world), its export, then `equilibrate ppo fit` with
    the constraint recipe for 2 iterations: lambda is logged and checkpointed, and the checkpoint exports
    with the cost model's path taken from the command line."""
    run = _equilibrate(["cost", "fit", "--config", str(REPO / "configs" / "cost" / "tiny.yaml"), "--trainer.max_steps", "4",
                        "--trainer.val_check_interval", "4", "--model.init_args.model.name_or_path", "builtin:tiny"],
                       tmp_path, equilibrate_cache)
    assert run.returncode == 0, run.stderr[-3000:]
    ckpt = tmp_path / "runs" / "cost" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["equilibrate_module"] == "equilibrate_pl.modules.cost.CostModule"
    metrics = (tmp_path / "runs" / "cost" / "logs" / "version_0" / "metrics.csv").read_text()
    assert "val/sign_accuracy" in metrics and "val/cost_unsafe" in metrics
    run = _equilibrate(["export", "--ckpt", str(ckpt), "--output", "runs/cost/export"], tmp_path, equilibrate_cache)
    assert run.returncode == 0, run.stderr[-3000:]

    run = _equilibrate(["ppo", "fit", "--config", str(REPO / "configs" / "ppo" / "tiny_lagrangian.yaml"), "--trainer.max_steps", "2",
                        "--model.init_args.actor.name_or_path", "builtin:tiny", "--model.init_args.reward_model.name_or_path",
                        "runs/cost/export", "--model.init_args.generation.max_new_tokens", "6",
                        "--model.init_args.constraint.update_delay", "0", "--data.batch_size", "4"], tmp_path, equilibrate_cache)
    assert run.returncode == 0, run.stderr[-3000:]
    ckpt = tmp_path / "runs" / "ppo-lagrangian" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    assert state["policy_state"]["lagrange_multiplier"]["costs"].numel() == 8  # 2 iterations x 4 episodes
    assert any(k.startswith("cost_critic.") for k in state["state_dict"])
    header = (tmp_path / "runs" / "ppo-lagrangian" / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "lagrangian/lambda" in header and "group/general/violation" in header
    run = _equilibrate(["export", "--ckpt", str(ckpt), "--output", "policy", "--module", "equilibrate_pl.modules.policy.PolicyModule",
                        "--model-path", "cost_model=runs/cost/export"], tmp_path, equilibrate_cache)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "policy" / "model.safetensors").is_file()


def _in_process(stage: str, args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run `equilibrate <stage> ...` in this process (no Python start-up per call); exit code, out, err."""
    from equilibrate_pl import cli

    try:
        code = cli.main([stage, *args])
    except SystemExit as stop:  # jsonargparse exits after --print_config and on errors
        code = int(stop.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("stage", ["sft", "rm", "cost", "dpo"])
def test_print_config_resolves_the_recipe(stage: str, capsys: pytest.CaptureFixture[str], equilibrate_cache: Path) -> None:
    code, out, err = _in_process(stage, ["fit", "--config", str(REPO / "configs" / stage / "tiny.yaml"), "--print_config"], capsys)
    assert code == 0, err[-3000:]
    config = yaml.safe_load(out)
    # the tiny recipes chain: every stage after SFT starts from the SFT export
    assert config["model"]["init_args"]["model"]["name_or_path"] == ("builtin:tiny" if stage == "sft" else "runs/sft/export")
    assert config["data"]["stage"] == ("sft" if stage == "sft" else "preference")
    assert "tokenizer" not in config["data"]  # linked from the model's name_or_path


@pytest.mark.parametrize(("stage", "option"), [("sft", "max_nonfinite_steps"), ("rm", "margin"), ("dpo", "beta"),
                                               ("ppo", "samples_per_prompt"), ("ppo", "constraint"),
                                               ("cost", "classification_weight")])
def test_print_config_without_a_config_shows_the_stage_module(stage: str, option: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _in_process(stage, ["fit", "--print_config"], capsys)
    assert code == 0, err[-3000:]
    model = yaml.safe_load(out)["model"]
    assert model["class_path"].startswith("equilibrate_pl.modules.") and option in model["init_args"]


def test_missing_model_path_is_one_line_naming_the_step_that_makes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # no runs/ here
    code, out, err = _in_process("ppo", ["fit", "--config", str(REPO / "configs" / "ppo" / "tiny.yaml")], capsys)
    assert code == 2
    line = err.strip()
    assert "\n" not in line and "Traceback" not in line
    assert line.startswith("equilibrate ppo: model.init_args.actor.name_or_path: model path 'runs/sft/export' does not exist")
    assert "equilibrate sft fit --config" in line and "configs/sft/tiny.yaml" in line
    assert "equilibrate export --ckpt runs/sft/checkpoints/last.ckpt --output runs/sft/export" in line
    # a trained but not exported model: the export command alone
    (tmp_path / "runs" / "sft" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "sft" / "checkpoints" / "last.ckpt").write_bytes(b"")
    code, _, err = _in_process("dpo", ["fit", "--config", str(REPO / "configs" / "dpo" / "tiny.yaml")], capsys)
    assert code == 2 and "export the trained model first: equilibrate export --ckpt runs/sft/checkpoints/last.ckpt" in err
    # the quickstart's recipes name the quickstart
    code, _, err = _in_process("rm", ["fit", "--config", str(REPO / "configs" / "quickstart" / "rm-naive.yaml")], capsys)
    assert code == 2 and "'runs/quickstart/sft' does not exist; made by `equilibrate quickstart`" in err


def test_stage_help_is_fast_and_lists_the_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    """`equilibrate dpo --help` answers without importing Lightning (seconds of imports)."""
    code = subprocess.run([sys.executable, "-c", "import sys; from equilibrate_pl.cli import main; rc = main(['dpo', '--help']); "
                           "assert 'lightning' not in sys.modules, 'imported Lightning'; sys.exit(rc)"],
                          capture_output=True, text=True, timeout=120)
    assert code.returncode == 0, code.stderr[-2000:]
    for word in ("fit", "validate", "--print_config", "configs/dpo/tiny.yaml"):
        assert word in code.stdout


def test_unknown_key_is_rejected_with_its_name(tmp_path: Path, capsys: pytest.CaptureFixture[str], equilibrate_cache: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    ama:\n      enabled: true\n      tokn_signal: implicit\n")
    code, _, err = _in_process("dpo", ["fit", "--config", str(REPO / "configs" / "dpo" / "tiny.yaml"), "--config", str(bad),
                                       "--print_config"], capsys)
    assert code != 0
    assert "tokn_signal" in err


@pytest.mark.parametrize("stage,option", [("sft", "--model.init_args.model.name_or_path"),
                                          ("ppo", "--model.init_args.actor.name_or_path")])
def test_the_data_are_tokenized_with_the_models_tokenizer(stage: str, option: str, equilibrate_cache: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose tokenizer is not the tiny one must not be trained on tiny-tokenizer ids (the data
    module used to keep `builtin:tiny` whatever model the config named)."""
    from lightning.pytorch import Trainer

    from equilibrate_pl.commands.train import make_cli
    from equilibrate_pl.models.tiny import tiny_model_dir

    other = str(tiny_model_dir(seed=1))  # its tokenizer is trained on another world: other ids
    monkeypatch.setattr(Trainer, "fit", lambda self, *args, **kwargs: None)
    extra = ["--model.init_args.reward_model.name_or_path", other] if stage == "ppo" else []
    cli = make_cli(stage, ["fit", "--config", str(REPO / "configs" / stage / "tiny.yaml"), option, other, *extra], announce=False)
    assert cli.datamodule.tokenizer_name == other
    from equilibrate_pl.data.tokenizer import load_tokenizer

    text = "How do I cook rice on the stove?"
    model_ids = load_tokenizer(other)(text)["input_ids"]
    assert load_tokenizer(cli.datamodule.tokenizer_name)(text)["input_ids"] == model_ids
    assert load_tokenizer("builtin:tiny")(text)["input_ids"] != model_ids  # so the test can tell them apart

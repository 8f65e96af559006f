"""The end of a training run: the final step is always in ``last.ckpt``, and a run that stopped
learning says so (issue 12, items 4 and 7)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from equilibrate_pl.cli import main as cli
from tests.modules.test_policy import make_trainer, prompt_datamodule, tiny_tokenizer_and_models, world_lexicon_reward
from tests.recipes import DPO_TINY_FROM_BASE

REPO = Path(__file__).resolve().parents[1]

EVERY_5 = """
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: ckpts, every_n_train_steps: 5, save_last: true, save_top_k: 0}
"""


def test_dpo_cli_last_ckpt_holds_the_final_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, equilibrate_cache: Path) -> None:
    """23 steps, a checkpoint every 5: `last.ckpt` must hold step 23, not 20."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "every5.yaml").write_text(EVERY_5)
    code = cli(["dpo", "fit", "--config", str(REPO / "configs" / "dpo" / "tiny.yaml"), *DPO_TINY_FROM_BASE, "--config", "every5.yaml",
                "--trainer.max_steps", "23", "--trainer.val_check_interval", "23", "--trainer.enable_progress_bar", "false",
                "--data.batch_size", "2", "--data.val_size", "2", "--model.init_args.precompute_reference", "false"])
    assert code == 0
    state = torch.load(tmp_path / "ckpts" / "last.ckpt", weights_only=True, map_location="cpu")
    assert state["global_step"] == 23


def _ppo(lr: float = 1e-2):
    from equilibrate_pl.modules.policy import PolicyModule

    tok, actor, _, critic = tiny_tokenizer_and_models()
    return PolicyModule.from_models(
        actor, tok, world_lexicon_reward(tok), critic=critic, generation={"max_new_tokens": 4},
        ppo={"minibatch_size": 2, "ppo_epochs": 1}, actor_optim={"lr": lr, "scheduler": "constant"},
        critic_optim={"lr": 1e-2, "scheduler": "constant"}, log_refusals=False,
    )


def test_ppo_last_ckpt_holds_the_final_step(tmp_path: Path, equilibrate_cache: Path) -> None:
    """12 PPO iterations, a checkpoint every 10 (manual optimization): `last.ckpt` holds step 12."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from equilibrate_pl.modules.common import FinalCheckpoint

    module = _ppo()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=10, save_last=True, save_top_k=0)
    make_trainer(max_steps=12, enable_checkpointing=True, callbacks=[FinalCheckpoint(), checkpoint]).fit(
        module, datamodule=prompt_datamodule(batch_size=2))
    state = torch.load(tmp_path / "last.ckpt", weights_only=True, map_location="cpu")
    assert state["global_step"] == 12
    final = {f"actor.{k}": v for k, v in module.actor.state_dict().items()}
    for key, value in final.items():
        torch.testing.assert_close(state["state_dict"][key], value, rtol=0, atol=0)


def test_zero_gradient_steps_are_counted_and_warned_about(tmp_path: Path, equilibrate_cache: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """A learning rate of 1e3 saturates the actor in one step; every later actor gradient is zero."""
    from equilibrate_pl.modules.common import ZeroGradientWatch

    watch = ZeroGradientWatch()
    with caplog.at_level(logging.WARNING, logger="equilibrate_pl"):
        make_trainer(max_steps=4, callbacks=[watch]).fit(_ppo(lr=1e3), datamodule=prompt_datamodule(batch_size=2))
    assert watch.zero_steps[0] >= 2, dict(watch.zero_steps)  # optimizer 0 is the actor
    assert watch.steps[0] >= watch.zero_steps[0]
    messages = [r.getMessage() for r in caplog.records]
    assert any("gradient of optimizer 0 is zero" in m for m in messages)
    assert any(f"zero gradient in {watch.zero_steps[0]} of {watch.steps[0]} steps" in m for m in messages)


def test_a_healthy_run_has_no_zero_gradient_warning(tmp_path: Path, equilibrate_cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    from equilibrate_pl.modules.common import ZeroGradientWatch

    watch = ZeroGradientWatch()
    with caplog.at_level(logging.WARNING, logger="equilibrate_pl"):
        make_trainer(max_steps=2, callbacks=[watch]).fit(_ppo(), datamodule=prompt_datamodule(batch_size=2))
    assert watch.steps[0] > 0 and not watch.zero_steps
    assert not any("zero" in r.getMessage() for r in caplog.records)

"""A run killed mid-way and resumed from its checkpoint ends exactly where an uninterrupted run ends
(DPO/ADPO and the cost model; PPO and PPO-Lagrangian in test_policy*.py).

The run uses LoRA dropout (so the RNG stream matters), a shuffled resumable sampler crossing an epoch
boundary, validation between steps, AdamW state and a cosine schedule: every piece of state a
checkpoint must carry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from equilibrate_pl.algorithms.ama import ADPOSettings
from equilibrate_pl.modules.common import AtomicCheckpointIO, ModelSettings, OptimSettings, RNGStateCallback
from equilibrate_pl.modules.cost import CostModule
from equilibrate_pl.modules.preference import PreferenceModule

MAX_STEPS = 6
KILL_AT = 3


class Killed(Exception):
    pass


class KillAt(L.Callback):
    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == KILL_AT:
            raise Killed


class Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])


def _run(tmp_path: Path, callbacks: list[L.Callback], implicit_model: str, ckpt_path: str | None = None,
         stage: str = "dpo") -> tuple[Any, Losses]:
    from equilibrate_pl.data import SafetyDataModule

    L.seed_everything(0)
    lora = ModelSettings(lora={"r": 4, "alpha": 8, "dropout": 0.2})
    optim = OptimSettings(lr=5e-3, warmup_steps=1, scheduler="cosine")
    if stage == "cost":  # the cost model: a scalar head on the LoRA model, safety labels in the batches
        module: Any = CostModule(model=lora, optim=optim, regularization=0.01)
    else:
        module = PreferenceModule(model=lora, reference="adapter_disabled", optim=optim, beta=0.1,
                                  ama=ADPOSettings(enabled=True, token_signal="implicit", baseline="batch_mean"),
                                  implicit_model=implicit_model)
    data = SafetyDataModule(stage="preference", world_scale="tiny", batch_size=24, eval_batch_size=8, val_size=8,
                            max_length=80, max_prompt_length=40, safety_labels=stage == "cost")
    losses = Losses()
    trainer = L.Trainer(
        max_steps=MAX_STEPS, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, val_check_interval=2, check_val_every_n_epoch=None, limit_val_batches=1,
        default_root_dir=tmp_path, plugins=[AtomicCheckpointIO()],
        callbacks=[*callbacks, losses, RNGStateCallback(),
                   ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=0)],
    )
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    except Killed:
        pass
    return module, losses


@pytest.mark.parametrize("stage", ["dpo", "cost"])
def test_killed_and_resumed_run_matches_uninterrupted(tmp_path: Path, equilibrate_cache: Path, implicit_model_dir: str,
                                                      stage: str) -> None:
    full, full_losses = _run(tmp_path / "full", [], implicit_model_dir, stage=stage)
    assert sorted(full_losses.losses) == list(range(1, MAX_STEPS + 1))

    killed, killed_losses = _run(tmp_path / "killed", [KillAt()], implicit_model_dir, stage=stage)
    assert max(killed_losses.losses) == KILL_AT  # it really stopped early
    last = tmp_path / "killed" / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == KILL_AT  # loads with weights_only=True

    resumed, resumed_losses = _run(tmp_path / "killed", [], implicit_model_dir, ckpt_path=str(last), stage=stage)
    assert sorted(resumed_losses.losses) == list(range(KILL_AT + 1, MAX_STEPS + 1))
    for step in range(1, KILL_AT + 1):
        assert killed_losses.losses[step] == pytest.approx(full_losses.losses[step], abs=1e-6)
    for step in range(KILL_AT + 1, MAX_STEPS + 1):
        assert resumed_losses.losses[step] == pytest.approx(full_losses.losses[step], abs=1e-5), step
    full_state, resumed_state = full.model.state_dict(), resumed.model.state_dict()
    for name, value in full_state.items():
        torch.testing.assert_close(resumed_state[name], value, rtol=0, atol=1e-6, msg=name)

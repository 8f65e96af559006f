"""Progress display for the command-line programs (module-level classes: a spawned run pickles its callbacks)."""

from __future__ import annotations

import time
from typing import Any, Callable

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """TQDM bar that also shows ``step k/max_steps``: runs are sized in optimizer steps, not epochs (with
    ``max_steps`` Lightning sets ``max_epochs=-1``, and its default rich bar reads "Epoch 7/-2")."""

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        if trainer.max_steps and trainer.max_steps > 0:
            metrics = {"step": f"{trainer.global_step}/{trainer.max_steps}", **metrics}
        return metrics


class ProgressLines(Callback):
    """One line every ~10% of the steps (``[name] step k/N, train/loss x (t s)``): a stage of several
    minutes is not silent, and a log file gets lines rather than a redrawn bar."""

    def __init__(self, name: str, say: Callable[[str], None] = print, prefix: str = "[quickstart]") -> None:
        self.name, self.say, self.prefix = name, say, prefix
        self._start, self._every, self._shown = 0.0, 1, -1

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._start, self._every = time.perf_counter(), max(1, trainer.max_steps // 10)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step and step != self._shown and (step % self._every == 0 or step == trainer.max_steps):
            self._shown = step
            loss = trainer.callback_metrics.get("train/loss")
            shown = f", train/loss {float(loss):.3f}" if loss is not None else ""
            self.say(f"{self.prefix} {self.name}: step {step}/{trainer.max_steps}{shown} ({time.perf_counter() - self._start:.0f}s)")

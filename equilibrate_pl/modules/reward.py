"""Reward model: a scalar head scored at every position, trained with the Bradley-Terry loss.

One forward pass gives both the sequence score (at the last real token, PITFALLS #3) and, through
differences of prefix scores, the dense per-token rewards that ADPO/APPO use as token signal.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torchmetrics.classification import BinaryAccuracy

from equilibrate_pl.algorithms.rewards import bradley_terry_loss, dense_rewards
from equilibrate_pl.modules.common import (
    SingleModelHooks,
    ModelSettings,
    NonFiniteGuard,
    OptimSettings,
    build_scalar_model,
    coerce_settings,
    log_per_group,
    rank_max,
    save_plain_hyperparameters,
)

IGNORE_INDEX = -100


def stack_pairs(batch: dict[str, Any], pad_token_id: int, keys: tuple[str, ...] = ("input_ids", "attention_mask", "labels")) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows in one (2B, L) batch, right-padded to the longer side.

    One forward pass over both halves instead of two: half the kernel launches and one weight read.
    """
    width = max(batch[f"chosen_{keys[0]}"].shape[1], batch[f"rejected_{keys[0]}"].shape[1])
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    out = {}
    for key in keys:
        parts = []
        for side in ("chosen", "rejected"):
            t = batch[f"{side}_{key}"]
            parts.append(F.pad(t, (0, width - t.shape[1]), value=fill.get(key, 0)))
        out[key] = torch.cat(parts, dim=0)
    return out


class RewardModule(SingleModelHooks, LightningModule):
    """Bradley-Terry reward model on preference batches.

    Args:
        model: backbone to load (a causal LM gets a new scalar head; a saved reward model keeps its own).
        optim: AdamW and schedule.
        margin: constant margin in the loss; a per-pair ``margin`` tensor in the batch is used instead
            when present.
        max_nonfinite_steps: stop after this many non-finite losses in a row.

    Override :meth:`compute_loss` to change the objective, :meth:`score` to change the scoring.
    """

    def __init__(
        self,
        model: ModelSettings | None = None,
        optim: OptimSettings | None = None,
        margin: float = 0.0,
        max_nonfinite_steps: int = 3,
    ) -> None:
        super().__init__()
        self.model_settings: ModelSettings = coerce_settings(ModelSettings, model) or ModelSettings()
        self.optim: OptimSettings = coerce_settings(OptimSettings, optim) or OptimSettings(lr=1e-4)
        self.margin = margin
        save_plain_hyperparameters(
            self, model=self.model_settings, optim=self.optim, margin=margin, max_nonfinite_steps=max_nonfinite_steps
        )
        self.model, self.tokenizer = build_scalar_model(self.model_settings)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps modes as they are
        self.guard = NonFiniteGuard(max_nonfinite_steps)
        self.train_accuracy = BinaryAccuracy()
        self.val_accuracy = BinaryAccuracy()

    # -- scoring ---------------------------------------------------------------------------

    def position_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) float scores of every prefix (zero on padding)."""
        from equilibrate_pl.models import position_scores

        return position_scores(self.model, input_ids, attention_mask)

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,) sequence scores: the prefix score at each row's last real token."""
        from equilibrate_pl.models import last_token_scores

        return last_token_scores(self.position_scores(input_ids, attention_mask), attention_mask)

    @torch.no_grad()
    def dense_token_rewards(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, L) per-token rewards ``S_t - S_{t-1}`` on response tokens (``labels != -100``), 0 elsewhere.

        Entry t is the reward of token t; over a response they sum to its sequence score minus the
        score at the end of the prompt. One forward pass.
        """
        scores = self.position_scores(input_ids, attention_mask)
        return dense_rewards(scores, (labels != IGNORE_INDEX) & attention_mask.bool())

    # -- the objective ---------------------------------------------------------------------

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(mean loss, stats)`` with per-pair ``chosen``/``rejected`` scores in ``stats``."""
        pairs = stack_pairs(batch, self.tokenizer.pad_token_id, keys=("input_ids", "attention_mask"))
        scores = self.score(pairs["input_ids"], pairs["attention_mask"])
        chosen, rejected = scores.chunk(2)
        margin = batch.get("margin", self.margin)
        if isinstance(margin, torch.Tensor):
            margin = margin.to(chosen)
        losses = bradley_terry_loss(chosen, rejected, margin)
        return losses.mean(), {"chosen": chosen.detach(), "rejected": rejected.detach()}

    def _log_step(self, split: str, batch: dict[str, Any], loss: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        bs = stats["chosen"].shape[0]
        correct = (stats["chosen"] > stats["rejected"]).long()  # ties count as wrong
        metric = self.train_accuracy if split == "train" else self.val_accuracy
        metric(correct, torch.ones_like(correct))
        sync = split == "val"
        self.log(f"{split}/loss", loss, prog_bar=True, batch_size=bs, sync_dist=sync)
        self.log(f"{split}/accuracy", metric, prog_bar=True, batch_size=bs)
        self.log(f"{split}/score_chosen", stats["chosen"].mean(), batch_size=bs, sync_dist=sync)
        self.log(f"{split}/score_rejected", stats["rejected"].mean(), batch_size=bs, sync_dist=sync)
        self.log(f"{split}/margin", (stats["chosen"] - stats["rejected"]).mean(), batch_size=bs, sync_dist=sync)
        log_per_group(self, f"{split}/accuracy_group", correct.float(), batch.get("group"))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        loss, stats = self.compute_loss(batch)
        if not self.guard.check(loss, step=self.global_step, sync=rank_max(self)):
            self.log("train/skipped_steps", float(self.guard.total_skipped), batch_size=stats["chosen"].shape[0])
            return None
        self._log_step("train", batch, loss, stats)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, stats = self.compute_loss(batch)
        self._log_step("val", batch, loss, stats)

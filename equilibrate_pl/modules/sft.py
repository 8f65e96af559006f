"""Supervised fine-tuning: next-token loss on response tokens only (full, LoRA or QLoRA)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule

from equilibrate_pl.algorithms.logprobs import token_logprobs
from equilibrate_pl.data.schema import IGNORE_INDEX
from equilibrate_pl.modules.common import (
    ModelSettings,
    NonFiniteGuard,
    OptimSettings,
    SingleModelHooks,
    build_causal_lm,
    coerce_settings,
    log_per_group,
    rank_max,
    save_plain_hyperparameters,
)


class SFTModule(SingleModelHooks, LightningModule):
    """Causal-LM fine-tuning on prompt/response batches (``labels`` is -100 on prompt and padding).

    The loss is the mean negative log-likelihood over every labelled token of the batch (the eos
    included, so the model learns to stop). Full fine-tuning, LoRA (``model.lora``) or QLoRA
    (``model.lora`` + ``model.quant``) are chosen by :class:`ModelSettings`.

    Override :meth:`compute_loss` to change the objective.

    Args:
        model: what to load (``ModelSettings``).
        optim: AdamW and schedule (``OptimSettings``).
        max_nonfinite_steps: stop after this many non-finite losses in a row (single ones are skipped).
    """

    def __init__(
        self,
        model: ModelSettings | None = None,
        optim: OptimSettings | None = None,
        max_nonfinite_steps: int = 3,
    ) -> None:
        super().__init__()
        self.model_settings: ModelSettings = coerce_settings(ModelSettings, model) or ModelSettings()
        self.optim: OptimSettings = coerce_settings(OptimSettings, optim) or OptimSettings(lr=1e-4)
        save_plain_hyperparameters(self, model=self.model_settings, optim=self.optim, max_nonfinite_steps=max_nonfinite_steps)
        self.model, self.tokenizer = build_causal_lm(self.model_settings)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps modes as they are
        self.guard = NonFiniteGuard(max_nonfinite_steps)

    # -- the objective ---------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, V) logits."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, stats)``: token-mean NLL over labelled tokens; stats has per-row ``row_nll`` (B,)."""
        labels = batch["labels"]
        mask = labels != IGNORE_INDEX
        logits = self(batch["input_ids"], batch["attention_mask"])
        logps = token_logprobs(logits, labels, mask)  # (B, L-1)
        n_tokens = mask[:, 1:].sum(-1)
        loss = -logps.sum() / n_tokens.sum().clamp(min=1)
        row_nll = -logps.sum(-1) / n_tokens.clamp(min=1)
        return loss, {"row_nll": row_nll.detach(), "tokens": n_tokens.sum().detach()}

    # -- Lightning hooks -------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        loss, stats = self.compute_loss(batch)
        bs = batch["input_ids"].shape[0]
        if not self.guard.check(loss, step=self.global_step, sync=rank_max(self)):
            self.log("train/skipped_steps", float(self.guard.total_skipped), batch_size=bs)
            return None
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/tokens", stats["tokens"].float(), reduce_fx="sum", batch_size=bs)
        log_per_group(self, "train/loss_group", stats["row_nll"], batch.get("group"))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, stats = self.compute_loss(batch)
        # Weight by tokens so the epoch value is the token-mean NLL of the whole split.
        self.log("val/loss", loss, prog_bar=True, batch_size=int(stats["tokens"].clamp(min=1)), sync_dist=True)
        log_per_group(self, "val/loss_group", stats["row_nll"], batch.get("group"))

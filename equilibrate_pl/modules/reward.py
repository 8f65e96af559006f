"""Reward model: a scalar head scored at every position, trained with the Bradley-Terry loss.

One forward pass gives both the sequence score (at the last real token) and, through differences
of prefix scores, the dense per-token rewards that ADPO/APPO use as token signal. With
``prefix_weight`` > 0 (default 0.1) every prefix score is also trained to predict its sequence's
score (``algorithms.rewards.prefix_value_loss``), so those differences credit the tokens that
change the outcome; the pairs then run as stacked rows (every position's score is needed). With
``prefix_weight`` 0 training needs only the sequence scores of each pair:
:func:`~equilibrate_pl.models.forward.forward_scores` (each pair one packed row, the prompt
computed once; ``share_prompt``, ``length_groups``).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule
from torchmetrics.classification import BinaryAccuracy

from equilibrate_pl.algorithms.rewards import bradley_terry_loss, dense_rewards, prefix_value_loss
from equilibrate_pl.data.schema import IGNORE_INDEX
from equilibrate_pl.models.forward import forward_scores, sequence_scores, stack_pairs
from equilibrate_pl.models.scalar_head import last_token_scores, position_scores
from equilibrate_pl.modules.common import (
    ModelSettings,
    NonFiniteGuard,
    OptimSettings,
    SingleModelHooks,
    build_scalar_model,
    coerce_settings,
    log_per_group,
    rank_max,
    save_plain_hyperparameters,
    step_is_logged,
)


class RewardModule(SingleModelHooks, LightningModule):
    """Bradley-Terry reward model on preference batches.

    Args:
        model: backbone to load (a causal LM gets a new scalar head; a saved reward model keeps its own).
        optim: AdamW and schedule.
        margin: constant margin in the loss; a per-pair ``margin`` tensor in the batch is used instead
            when present.
        max_nonfinite_steps: stop after this many non-finite losses in a row.
        length_groups: rows (packed pairs, or stacked rows of a causal model) run in up to this many
            forwards of rows of similar length, each cut to its longest row (less padding, same
            scores); a split is made only when it saves more than 10% of the padded positions per
            extra forward. 1 = one forward (on a GPU with few, short rows usually the faster choice).
            Always 1 with several processes (under FSDP every rank must run the same forwards).
        share_prompt: score each pair as one packed row, its prompt computed once (same scores), where
            the model takes a 4-D mask and position ids (sdpa or eager attention) and rows are right
            padded; otherwise, or with ``False``, chosen and rejected run as stacked rows.
        prefix_weight: weight of the prefix-value term: every prefix score from the end of the prompt
            on regresses to its sequence's (detached) score, so that dense rewards (differences of
            prefix scores, ADPO's and APPO's token signal) mean something. 0 = Bradley-Terry alone,
            whose prefix scores are untrained extrapolations: on the built-in world the rewards of a
            response's first three tokens ranked held-out pairs no better than chance (0.56) with 0,
            0.91 with 0.1; 1.0 pulled the sequence scores towards each other (pair accuracy 1.00 ->
            0.94 on the default world). Logged as ``train/prefix_value``.

    Training-step diagnostics (score means, margin, per-group accuracy) are logged on the steps
    Lightning writes to its loggers (``log_every_n_steps``), at the end of an epoch and of training
    (:func:`~equilibrate_pl.modules.common.step_is_logged`); loss and accuracy also every step while a
    progress bar shows them. Validation logs every batch (exact epoch means).

    Override :meth:`compute_loss` to change the objective, :meth:`pair_scores` to change how pairs are
    scored; :meth:`score` and :meth:`dense_token_rewards` score single sequences.
    """

    def __init__(
        self,
        model: ModelSettings | None = None,
        optim: OptimSettings | None = None,
        margin: float = 0.0,
        max_nonfinite_steps: int = 3,
        length_groups: int = 2,
        share_prompt: bool = True,
        prefix_weight: float = 0.1,
    ) -> None:
        super().__init__()
        if length_groups < 1:
            raise ValueError(f"length_groups must be >= 1, got {length_groups}")
        if prefix_weight < 0:
            raise ValueError(f"prefix_weight must be >= 0, got {prefix_weight}")
        self.prefix_weight = prefix_weight
        self.model_settings: ModelSettings = coerce_settings(ModelSettings, model) or ModelSettings()
        self.optim: OptimSettings = coerce_settings(OptimSettings, optim) or OptimSettings(lr=1e-4)
        self.margin = margin
        self.length_groups = length_groups
        save_plain_hyperparameters(
            self, model=self.model_settings, optim=self.optim, margin=margin, max_nonfinite_steps=max_nonfinite_steps,
            length_groups=length_groups, share_prompt=share_prompt, prefix_weight=prefix_weight,
        )
        self.share_prompt = share_prompt
        self.model, self.tokenizer = build_scalar_model(self.model_settings)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps modes as they are
        self.guard = NonFiniteGuard(max_nonfinite_steps)
        # Validation accumulates correct/total over the epoch (exact, synced across ranks); a
        # training step logs its own batch's accuracy, a plain mean.
        self.val_accuracy = BinaryAccuracy()

    # -- scoring ---------------------------------------------------------------------------

    def position_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) float scores of every prefix (zero on padding)."""
        return position_scores(self.model, input_ids, attention_mask)

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,) sequence scores: the prefix score at each row's last real token
        (:func:`~equilibrate_pl.models.forward.sequence_scores`, up to ``length_groups`` forwards)."""
        return sequence_scores(self.model, input_ids, attention_mask, self.length_groups)

    @torch.no_grad()
    def dense_token_rewards(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B, L) per-token rewards ``S_t - S_{t-1}`` on response tokens (``labels != -100``), 0 elsewhere.

        Entry t is the reward of token t; over a response they sum to its sequence score minus the
        score at the end of the prompt. One forward pass.
        """
        scores = self.position_scores(input_ids, attention_mask)
        return dense_rewards(scores, (labels != IGNORE_INDEX) & attention_mask.bool())

    # -- the objective ---------------------------------------------------------------------

    def pair_scores(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(chosen, rejected)`` (B,) float32 sequence scores of the batch's pairs
        (:func:`~equilibrate_pl.models.forward.forward_scores`)."""
        pad = self.tokenizer.pad_token_id
        pairs = stack_pairs(batch, pad, keys=("input_ids", "attention_mask"))
        chosen, rejected = forward_scores(self.model, pairs, pad, self.share_prompt, self.length_groups).chunk(2)
        return chosen, rejected

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(mean loss, stats)`` with per-pair ``chosen``/``rejected`` scores in ``stats`` (and the
        per-row ``prefix_value`` loss when ``prefix_weight`` > 0)."""
        value = None
        if self.prefix_weight > 0:
            pairs = stack_pairs(batch, self.tokenizer.pad_token_id, keys=("input_ids", "attention_mask", "labels"))
            scores = position_scores(self.model, pairs["input_ids"], pairs["attention_mask"])
            final = last_token_scores(scores, pairs["attention_mask"])
            value = prefix_value_loss(scores, pairs["labels"] != IGNORE_INDEX, final)
            chosen, rejected = final.chunk(2)
        else:
            chosen, rejected = self.pair_scores(batch)
        margin = batch.get("margin", self.margin)
        if isinstance(margin, torch.Tensor):
            margin = margin.to(chosen)
        loss = bradley_terry_loss(chosen, rejected, margin).mean()
        stats = {"chosen": chosen.detach(), "rejected": rejected.detach()}
        if value is not None:
            loss = loss + self.prefix_weight * value.mean()
            stats["prefix_value"] = value.detach()
        return loss, stats

    def _log_train(self, batch: dict[str, Any], loss: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        full = step_is_logged(self)
        if not full and self._trainer is not None and self.trainer.progress_bar_callback is None:
            return  # nobody reads this step's values
        bs = stats["chosen"].shape[0]
        correct = (stats["chosen"] > stats["rejected"]).float()  # ties count as wrong
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/accuracy", correct.mean(), prog_bar=True, batch_size=bs)
        if full:
            means = torch.stack([stats["chosen"], stats["rejected"], stats["chosen"] - stats["rejected"]]).mean(-1)
            self.log_dict({"train/score_chosen": means[0], "train/score_rejected": means[1], "train/margin": means[2]},
                          batch_size=bs)
            if "prefix_value" in stats:
                self.log("train/prefix_value", stats["prefix_value"].mean(), batch_size=bs)
            log_per_group(self, "train/accuracy_group", correct, batch.get("group"))

    def _log_val(self, batch: dict[str, Any], loss: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        bs = stats["chosen"].shape[0]
        correct = (stats["chosen"] > stats["rejected"]).long()  # ties count as wrong
        self.val_accuracy(correct, torch.ones_like(correct))
        self.log("val/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("val/accuracy", self.val_accuracy, prog_bar=True, batch_size=bs)
        self.log("val/score_chosen", stats["chosen"].mean(), batch_size=bs, sync_dist=True)
        self.log("val/score_rejected", stats["rejected"].mean(), batch_size=bs, sync_dist=True)
        self.log("val/margin", (stats["chosen"] - stats["rejected"]).mean(), batch_size=bs, sync_dist=True)
        if "prefix_value" in stats:
            self.log("val/prefix_value", stats["prefix_value"].mean(), batch_size=bs, sync_dist=True)
        log_per_group(self, "val/accuracy_group", correct.float(), batch.get("group"))
        log_per_group(self, "val/accuracy_kind", correct.float(), batch.get("pair_kind"))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        loss, stats = self.compute_loss(batch)
        if not self.guard.check(loss, step=self.global_step, sync=rank_max(self)):
            self.log("train/skipped_steps", float(self.guard.total_skipped), batch_size=stats["chosen"].shape[0])
            return None
        self._log_train(batch, loss, stats)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, stats = self.compute_loss(batch)
        self._log_val(batch, loss, stats)

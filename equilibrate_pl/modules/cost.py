"""Cost model: a scalar head whose score is a cost (> 0 unsafe), trained with Safe RLHF's loss.

``CostModule`` is a :class:`~equilibrate_pl.modules.reward.RewardModule` with another objective: the
model, its loading (LoRA, 4/8-bit, gradient checkpointing), the pair scoring (each pair one packed
row, ``share_prompt`` / ``length_groups``), per-prefix scores, the non-finite guard and the export are
the reward model's, so a cost model loads wherever a reward model does (``PolicyModule``'s
``cost_model``, ``equilibrate eval --cost``). What differs is the data, per-pair safety labels
(``chosen_unsafe`` / ``rejected_unsafe``, docs/DATA.md), and the loss,
:func:`~equilibrate_pl.algorithms.cost.cost_model_loss`: safe-rlhf's sequence-wise cost loss
(``safe_rlhf/values/cost/trainer.py``): a Bradley-Terry term that puts the more harmful response of
a pair above the other, and a classification term per response that puts unsafe responses above 0
and safe ones below.
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics.classification import BinaryAccuracy

from equilibrate_pl.algorithms.cost import cost_model_loss
from equilibrate_pl.modules.common import ModelSettings, OptimSettings, log_per_group, save_plain_hyperparameters, step_is_logged
from equilibrate_pl.modules.reward import RewardModule

__all__ = ["CostModule"]


class CostModule(RewardModule):
    """Safe RLHF's cost model on preference batches that carry safety labels.

    Args:
        model, optim, max_nonfinite_steps, length_groups, share_prompt: as for :class:`RewardModule`.
        classification_weight: weight of the per-response sign terms (1 in safe-rlhf).
        regularization: weight of the mean squared cost (safe-rlhf's ``regularization``; 0 = off).

    Batches need ``chosen_unsafe``, ``rejected_unsafe`` and ``harm_order`` (``data.collate``;
    ``SafetyDataModule(safety_labels=True)``, which ``equilibrate cost`` sets). Logged: ``loss``;
    ``accuracy``, the share of *ordered* pairs (one response more harmful than the other) whose
    more harmful response costs more; ``sign_accuracy``, the share of responses on the right side of
    0, also for the unsafe and the safe ones apart (``sign_accuracy_unsafe`` / ``_safe``: most
    responses are safe, so the overall share can hide a model that calls everything safe); mean cost
    of safe and unsafe responses; per FDC group and per pair kind (``val/sign_accuracy_kind/...``).
    """

    def __init__(
        self,
        model: ModelSettings | None = None,
        optim: OptimSettings | None = None,
        classification_weight: float = 1.0,
        regularization: float = 0.0,
        max_nonfinite_steps: int = 3,
        length_groups: int = 2,
        share_prompt: bool = True,
    ) -> None:
        if classification_weight < 0 or regularization < 0:
            raise ValueError(f"classification_weight and regularization must be >= 0, got {classification_weight}, {regularization}")
        super().__init__(model=model, optim=optim, max_nonfinite_steps=max_nonfinite_steps, length_groups=length_groups,
                         share_prompt=share_prompt)
        self.classification_weight = classification_weight
        self.regularization = regularization
        save_plain_hyperparameters(
            self, model=self.model_settings, optim=self.optim, classification_weight=classification_weight,
            regularization=regularization, max_nonfinite_steps=max_nonfinite_steps, length_groups=length_groups,
            share_prompt=share_prompt,
        )
        self.val_sign_accuracy = BinaryAccuracy()

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(mean loss, stats)``; stats hold the per-pair ``chosen`` / ``rejected`` costs (detached)."""
        if "harm_order" not in batch:
            raise ValueError(
                "a cost model needs each pair's safety labels (chosen_unsafe, rejected_unsafe; docs/DATA.md) in its "
                "batches: set data.safety_labels: true (equilibrate cost does) and give files those columns"
            )
        chosen, rejected = self.pair_scores(batch)
        losses = cost_model_loss(chosen, rejected, batch["chosen_unsafe"], batch["rejected_unsafe"], batch["harm_order"],
                                 self.classification_weight, self.regularization)
        return losses.mean(), {"chosen": chosen.detach(), "rejected": rejected.detach()}

    @staticmethod
    def _judged(batch: dict[str, Any], stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-response costs, labels and sign correctness ([chosen; rejected], 2B), and per ordered
        pair whether the more harmful response costs more."""
        costs = torch.cat([stats["chosen"], stats["rejected"]])
        unsafe = torch.cat([batch["chosen_unsafe"], batch["rejected_unsafe"]]).to(costs.device)
        order = batch["harm_order"].to(costs)
        ordered = order != 0
        return {
            "costs": costs, "unsafe": unsafe, "sign_correct": (costs > 0) == unsafe,
            "order_correct": (order * (stats["rejected"] - stats["chosen"]) > 0)[ordered],  # ties count as wrong
        }

    def _log_train(self, batch: dict[str, Any], loss: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        full = step_is_logged(self)
        if not full and self._trainer is not None and self.trainer.progress_bar_callback is None:
            return  # nobody reads this step's values
        bs = stats["chosen"].shape[0]
        judged = self._judged(batch, stats)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/sign_accuracy", judged["sign_correct"].float().mean(), prog_bar=True, batch_size=2 * bs)
        if full:
            self._log_costs("train", judged)
            if judged["order_correct"].numel():
                self.log("train/accuracy", judged["order_correct"].float().mean(), batch_size=judged["order_correct"].numel())

    def _log_val(self, batch: dict[str, Any], loss: torch.Tensor, stats: dict[str, torch.Tensor]) -> None:
        bs = stats["chosen"].shape[0]
        judged = self._judged(batch, stats)
        self.log("val/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        correct = judged["sign_correct"].long()
        self.val_sign_accuracy(correct, torch.ones_like(correct))
        self.log("val/sign_accuracy", self.val_sign_accuracy, prog_bar=True, batch_size=2 * bs)
        if judged["order_correct"].numel():
            correct = judged["order_correct"].long()
            self.val_accuracy(correct, torch.ones_like(correct))
            self.log("val/accuracy", self.val_accuracy, batch_size=correct.numel())
        self._log_costs("val", judged)
        groups = list(batch.get("group") or ()) * 2 or None
        kinds = list(batch.get("pair_kind") or ()) * 2 or None
        log_per_group(self, "val/sign_accuracy_group", judged["sign_correct"].float(), groups)
        log_per_group(self, "val/sign_accuracy_kind", judged["sign_correct"].float(), kinds)

    def _log_costs(self, prefix: str, judged: dict[str, torch.Tensor]) -> None:
        """Sign accuracy and mean cost of the unsafe and the safe responses apart (epoch means weighted
        by their counts; a batch without one kind logs nothing for it)."""
        for name, rows in (("unsafe", judged["unsafe"]), ("safe", ~judged["unsafe"])):
            n = int(rows.sum())
            if n:
                self.log(f"{prefix}/sign_accuracy_{name}", judged["sign_correct"][rows].float().mean(), batch_size=n)
                self.log(f"{prefix}/cost_{name}", judged["costs"][rows].mean(), batch_size=n)

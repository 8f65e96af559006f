"""The cost model's objective (Safe RLHF, Dai et al., 2024, eq. 6), as pure torch.

A cost model is a scalar model like a reward model, trained so that its score is a *cost*: higher
means more harmful, and its sign classifies a response (> 0 unsafe, < 0 safe). Safe RLHF's loss has
two parts per pair:

- pairwise: ``-log sigma(c_more_harmful - c_less_harmful)``, the Bradley-Terry term on the safety
  ordering (not the helpfulness one);
- classification: ``-log sigma(s_y * c_y)`` for each response, with ``s_y = +1`` for an unsafe and
  ``-1`` for a safe response, which anchors 0 as the boundary between safe and unsafe.

This is safe-rlhf's ``CostTrainer.loss`` with ``loss_type='sequence-wise'``
(``safe_rlhf/values/cost/trainer.py``): the mean over pairs of the pairwise term plus both
classification terms, plus ``regularization`` times the mean squared cost. One generalisation: a
pair whose responses have no safety ordering (both safe or both unsafe, and no stated safer one;
e.g. a helpful answer and a refusal to a benign prompt) contributes only its classification terms
(``harm_order = 0``). safe-rlhf's data always names a safer response, and then the two agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["cost_model_loss", "cost_sign"]


def cost_sign(unsafe: torch.Tensor) -> torch.Tensor:
    """+1 for an unsafe response, -1 for a safe one (safe-rlhf's "cost sign")."""
    return torch.where(unsafe.bool(), 1.0, -1.0)


def cost_model_loss(
    chosen_costs: torch.Tensor,
    rejected_costs: torch.Tensor,
    chosen_unsafe: torch.Tensor,
    rejected_unsafe: torch.Tensor,
    harm_order: torch.Tensor,
    classification_weight: float = 1.0,
    regularization: float = 0.0,
) -> torch.Tensor:
    """Per-pair cost-model losses, (B,) float32; the training loss is their mean.

    Args:
        chosen_costs, rejected_costs: (B,) sequence costs (the score at each response's last token).
        chosen_unsafe, rejected_unsafe: (B,) bool safety labels of the two responses.
        harm_order: (B,) +1 where ``rejected`` is the more harmful response, -1 where ``chosen`` is,
            0 where the pair has no safety ordering (no pairwise term).
        classification_weight: weight of the two sign terms (align-anything's ``scale_coeff``; 1 in
            safe-rlhf).
        regularization: weight of ``(c_chosen^2 + c_rejected^2) / 2`` (safe-rlhf's ``regularization``,
            the mean of the squared costs), which keeps costs near the origin.
    """
    chosen, rejected = chosen_costs.float(), rejected_costs.float()
    if not (chosen.shape == rejected.shape == chosen_unsafe.shape == rejected_unsafe.shape == harm_order.shape) or chosen.ndim != 1:
        raise ValueError(
            f"expected (B,) tensors of one shape, got costs {tuple(chosen.shape)} / {tuple(rejected.shape)}, labels "
            f"{tuple(chosen_unsafe.shape)} / {tuple(rejected_unsafe.shape)}, harm_order {tuple(harm_order.shape)}"
        )
    order = harm_order.to(chosen)
    pairwise = -F.logsigmoid(order * (rejected - chosen)) * (order != 0)
    classification = -F.logsigmoid(cost_sign(chosen_unsafe) * chosen) - F.logsigmoid(cost_sign(rejected_unsafe) * rejected)
    loss = pairwise + classification_weight * classification
    if regularization:
        loss = loss + regularization * (chosen.square() + rejected.square()) / 2
    return loss

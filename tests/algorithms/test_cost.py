"""The cost model's loss against hand-computed values and against safe-rlhf's formula written out."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from equilibrate_pl.algorithms.cost import cost_model_loss


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_by_hand() -> None:
    chosen = torch.tensor([-1.0, 0.5, 2.0])
    rejected = torch.tensor([2.0, -0.5, 1.0])
    chosen_unsafe = torch.tensor([False, False, True])
    rejected_unsafe = torch.tensor([True, False, True])
    order = torch.tensor([1.0, 0.0, -1.0])  # rejected more harmful / no order / chosen more harmful
    losses = cost_model_loss(chosen, rejected, chosen_unsafe, rejected_unsafe, order)
    expected = [
        -_log_sigmoid(2.0 - -1.0) - _log_sigmoid(-1 * -1.0) - _log_sigmoid(1 * 2.0),
        -_log_sigmoid(-1 * 0.5) - _log_sigmoid(-1 * -0.5),  # both safe, no pairwise term
        -_log_sigmoid(2.0 - 1.0) - _log_sigmoid(2.0) - _log_sigmoid(1.0),  # chosen is the more harmful
    ]
    assert losses.tolist() == pytest.approx(expected, rel=1e-6)
    weighted = cost_model_loss(chosen, rejected, chosen_unsafe, rejected_unsafe, order, classification_weight=0.0,
                               regularization=0.5)
    assert weighted.tolist() == pytest.approx([
        -_log_sigmoid(3.0) + 0.5 * (1 + 4) / 2, 0.5 * (0.25 + 0.25) / 2, -_log_sigmoid(1.0) + 0.5 * (4 + 1) / 2], rel=1e-6)


def test_matches_safe_rlhfs_sequence_wise_loss_when_every_pair_names_the_safer_response() -> None:
    """safe-rlhf (safe_rlhf/values/cost/trainer.py, loss_type='sequence-wise') takes (safer, unsafer)
    pairs with a safety sign (+1 safe / -1 unsafe) per response; written out here independently."""
    g = torch.Generator().manual_seed(0)
    lower_end_cost, higher_end_cost = torch.randn(16, generator=g), torch.randn(16, generator=g)
    safer_safety_sign = torch.where(torch.rand(16, generator=g) < 0.7, 1, -1)
    unsafer_safety_sign = torch.where(torch.rand(16, generator=g) < 0.3, 1, -1)
    regularization = 0.01
    lower_cost_sign, higher_cost_sign = -safer_safety_sign, -unsafer_safety_sign
    reference = (
        -F.logsigmoid(higher_end_cost - lower_end_cost)
        - F.logsigmoid(lower_cost_sign * lower_end_cost)
        - F.logsigmoid(higher_cost_sign * higher_end_cost)
    ).mean() + regularization * torch.stack([lower_end_cost, higher_end_cost]).square().mean()
    ours = cost_model_loss(lower_end_cost, higher_end_cost, safer_safety_sign < 0, unsafer_safety_sign < 0,
                           torch.ones(16), regularization=regularization).mean()
    assert ours.item() == pytest.approx(reference.item(), rel=1e-6)


def test_gradient_pushes_unsafe_costs_up_and_safe_costs_down() -> None:
    chosen = torch.zeros(2, requires_grad=True)
    rejected = torch.zeros(2, requires_grad=True)
    cost_model_loss(chosen, rejected, torch.tensor([False, False]), torch.tensor([True, False]), torch.tensor([1.0, 0.0])).sum().backward()
    assert chosen.grad[0] > 0 and rejected.grad[0] < 0  # descent lowers the safe cost, raises the unsafe one
    assert chosen.grad[1] > 0 and rejected.grad[1] > 0  # both safe: both pushed below zero


def test_shapes_are_checked() -> None:
    with pytest.raises(ValueError, match="one shape"):
        cost_model_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool), torch.zeros(2))

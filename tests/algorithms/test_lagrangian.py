"""PPO-Lagrangian math against hand-computed values (and safe-rlhf's update written out by hand)."""

from __future__ import annotations

import io
import math

import pytest
import torch

from equilibrate_pl.algorithms.lagrangian import LagrangeMultiplier, combine_advantages, multiplier_loss


def test_combine_advantages_by_hand() -> None:
    reward = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    cost = torch.tensor([[3.0, 1.0], [-1.0, 2.0]])
    # lambda = 1: (A_r - A_c) / 2
    assert combine_advantages(reward, cost, 1.0).tolist() == [[-1.0, -1.5], [0.75, -1.0]]
    # lambda = 0: exactly the reward advantage
    assert torch.equal(combine_advantages(reward, cost, 0.0), reward)
    # lambda = 3: (A_r - 3 A_c) / 4, e.g. (1 - 9) / 4 = -2
    assert combine_advantages(reward, cost, torch.tensor(3.0)).tolist() == [[-2.0, -1.25], [0.875, -1.5]]
    # a huge lambda leaves only -A_c
    assert torch.allclose(combine_advantages(reward, cost, 1e9), -cost, atol=1e-6)
    with pytest.raises(ValueError, match=">= 0"):
        combine_advantages(reward, cost, -0.1)
    with pytest.raises(ValueError, match="shape"):
        combine_advantages(reward, cost[:, :1], 1.0)


def test_multiplier_loss_value_and_gradient_by_hand() -> None:
    log_lambda = torch.tensor(math.log(2.0), requires_grad=True)
    loss = multiplier_loss(log_lambda, mean_cost=0.75, threshold=0.25)
    assert loss.item() == pytest.approx(-(0.75 - 0.25) * 2.0)
    loss.backward()
    # d/d log_lambda of -(J - d) * exp(log_lambda) = -(J - d) * lambda = -1.0
    assert log_lambda.grad.item() == pytest.approx(-1.0)


@pytest.mark.parametrize(("mean_cost", "direction"), [(0.5, 1), (-0.5, -1), (0.0, 0)])
def test_a_gradient_step_raises_lambda_while_the_cost_is_above_the_threshold(mean_cost: float, direction: int) -> None:
    log_lambda = torch.tensor(0.0, requires_grad=True)
    optimizer = torch.optim.SGD([log_lambda], lr=0.1)
    multiplier_loss(log_lambda, mean_cost, threshold=0.0).backward()
    optimizer.step()
    # log_lambda <- 0 + 0.1 * (J - 0) * exp(0)
    assert log_lambda.item() == pytest.approx(0.1 * mean_cost)
    assert (log_lambda.exp().item() > 1.0) - (log_lambda.exp().item() < 1.0) == direction


def test_multiplier_follows_safe_rlhfs_update_by_hand() -> None:
    """Three iterations, delay 1, window of 4 episodes, cap 1.5: each value written out."""
    m = LagrangeMultiplier(threshold=0.1, lambda_init=1.0, lambda_lr=0.5, lambda_max=1.5, delay=1, window=4)
    assert m.value == pytest.approx(1.0)
    # iteration 0 < delay: the costs enter the window, lambda stays
    assert not m.update([0.3, 0.5], iteration=0)
    assert m.value == pytest.approx(1.0) and m.mean_cost() == pytest.approx(0.4)
    # iteration 1: window [0.3, 0.5, 0.7, 0.1], mean 0.4; log_lambda = 0 + 0.5 * (0.4 - 0.1) * 1 = 0.15
    assert m.update([0.7, 0.1], iteration=1)
    assert m.mean_cost() == pytest.approx(0.4)
    assert m.value == pytest.approx(math.exp(0.15))
    # iteration 2: window keeps the last 4 episodes [0.7, 0.1, -0.9, -0.9], mean -0.25;
    # log_lambda = 0.15 + 0.5 * (-0.25 - 0.1) * exp(0.15)
    m.update([-0.9, -0.9], iteration=2)
    assert list(m.costs) == pytest.approx([0.7, 0.1, -0.9, -0.9])
    expected = 0.15 + 0.5 * (-0.35) * math.exp(0.15)
    assert m.value == pytest.approx(math.exp(expected))
    # a large violation is capped at lambda_max
    m.update([50.0] * 4, iteration=3)
    assert m.value == pytest.approx(1.5)


def test_window_zero_uses_only_the_current_iteration() -> None:
    m = LagrangeMultiplier(lambda_lr=0.0, window=0)
    m.update([1.0, 3.0], iteration=0)
    m.update([5.0], iteration=1)
    assert m.mean_cost() == 5.0 and m.value == 1.0  # lr 0: never moves


def test_state_dict_resumes_exactly() -> None:
    a = LagrangeMultiplier(threshold=0.0, lambda_init=0.5, lambda_lr=0.2, window=3)
    a.update([0.4, 0.2], iteration=0)
    state = a.state_dict()
    b = LagrangeMultiplier(threshold=0.0, lambda_init=0.5, lambda_lr=0.2, window=3)
    b.load_state_dict(state)
    for m in (a, b):
        m.update([0.9], iteration=1)
    assert a.value == b.value and list(a.costs) == list(b.costs)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["log_lambda"].dtype == torch.float64  # plain tensors and values


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="positive"):
        LagrangeMultiplier(lambda_init=0.0)
    with pytest.raises(ValueError, match="lambda_max"):
        LagrangeMultiplier(lambda_init=2.0, lambda_max=1.0)
    with pytest.raises(ValueError, match="finite"):
        LagrangeMultiplier().update([float("nan")], iteration=0)


def test_a_sustained_violation_overflows_an_uncapped_lambda_and_the_cap_holds_it() -> None:
    # log lambda moves by lr * (J - d) * lambda per step: 0.1 * 15 * lambda, so lambda = 1 -> e^1.5 = 4.48
    # -> 4.48 e^6.72 = 3.7e3 -> overflow. This is what a policy drifting to harm does to the multiplier.
    uncapped = LagrangeMultiplier(threshold=-8.0, lambda_init=1.0, lambda_lr=0.1)
    uncapped.update([7.0], iteration=0)
    assert uncapped.value == pytest.approx(math.exp(1.5))
    uncapped.update([7.0], iteration=1)
    assert uncapped.value == pytest.approx(math.exp(1.5) * math.exp(1.5 * math.exp(1.5)))
    with pytest.raises(ValueError, match="lambda overflowed .* set lambda_max"):
        for step in range(2, 6):
            uncapped.update([7.0], iteration=step)
    capped = LagrangeMultiplier(threshold=-8.0, lambda_init=1.0, lambda_lr=0.1, lambda_max=100.0)
    for step in range(10):
        capped.update([7.0], iteration=step)
    assert capped.value == pytest.approx(100.0)
    capped.update([-20.0], iteration=10)  # below the threshold again: lambda comes down from the cap
    assert capped.value == pytest.approx(100.0 * math.exp(-0.1 * 12.0 * 100.0))


def test_the_policy_modules_constraint_is_capped_by_default() -> None:
    from equilibrate_pl.modules.policy import ConstraintSettings

    assert ConstraintSettings().lambda_max == 100.0
    assert ConstraintSettings().multiplier().lambda_max == 100.0

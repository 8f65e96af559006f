"""dpo_loss and implicit_rewards against hand values and a per-example loop of the formula."""

from __future__ import annotations

import math

import pytest
import torch

from equilibrate_pl.algorithms.dpo import dpo_loss, implicit_rewards


def loop_dpo_loss(pc, pr, rc, rr, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """-(1-eps) log sigma(beta z) - eps log sigma(-beta z), z = (pi_w - ref_w) - (pi_l - ref_l), in Python floats."""
    out = []
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()):
        z = beta * ((a - c) - (b - d))
        log_sigmoid = lambda x: -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))  # noqa: E731
        out.append(-(1 - label_smoothing) * log_sigmoid(z) - label_smoothing * log_sigmoid(-z))
    return torch.tensor(out, dtype=torch.float64)


def random_logps(seed: int, batch: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Sequence log-prob sums: negative, tens of nats apart, as real ones are.
    return [-torch.rand(batch, generator=g, dtype=torch.float64) * 60 for _ in range(4)]


def test_all_zero_is_log_2() -> None:
    zeros = torch.zeros(3)
    # -log sigma(0) = -log(1/2) = log 2, whatever beta.
    torch.testing.assert_close(dpo_loss(zeros, zeros, zeros, zeros, beta=0.1), torch.full((3,), math.log(2.0)))


def test_hand_values() -> None:
    # z = (pi_w - ref_w) - (pi_l - ref_l) = (-1 - -2) - (-3 - -1) = 1 - (-2) = 3; beta z = 0.5 * 3 = 1.5
    # loss = -log sigma(1.5) = log(1 + e^-1.5)
    loss = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-1.0]), beta=0.5)
    torch.testing.assert_close(loss, torch.tensor([math.log1p(math.exp(-1.5))]))
    # With label smoothing 0.25: 0.75 log(1 + e^-1.5) + 0.25 log(1 + e^1.5)
    loss = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-1.0]),
                    beta=0.5, label_smoothing=0.25)
    expected = 0.75 * math.log1p(math.exp(-1.5)) + 0.25 * math.log1p(math.exp(1.5))
    torch.testing.assert_close(loss, torch.tensor([expected]))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("seed", range(3))
def test_matches_loop(seed: int, label_smoothing: float) -> None:
    pc, pr, rc, rr = random_logps(seed)
    beta = 0.05 + seed * 0.2
    out = dpo_loss(pc, pr, rc, rr, beta, label_smoothing)
    assert out.shape == pc.shape
    torch.testing.assert_close(out, loop_dpo_loss(pc, pr, rc, rr, beta, label_smoothing), rtol=1e-12, atol=1e-12)


def test_swapping_chosen_and_rejected_mirrors_the_loss() -> None:
    pc, pr, rc, rr = random_logps(4)
    beta = 0.3
    forward = dpo_loss(pc, pr, rc, rr, beta)
    swapped = dpo_loss(pr, pc, rr, rc, beta)
    # -log sigma(x) - -log sigma(-x) = -x, so forward - swapped = -beta z.
    z = (pc - rc) - (pr - rr)
    torch.testing.assert_close(forward - swapped, -beta * z)
    # label_smoothing 0.5 is symmetric: both orders give the same loss.
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta, 0.5), dpo_loss(pr, pc, rr, rc, beta, 0.5))


def test_label_smoothing_zero_is_plain_dpo() -> None:
    pc, pr, rc, rr = random_logps(5)
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, 0.2, label_smoothing=0.0), dpo_loss(pc, pr, rc, rr, 0.2),
                               rtol=0, atol=0)


def test_beta_scales_the_logits() -> None:
    pc, pr, rc, rr = random_logps(6)
    # beta * z with (beta, inputs) equals (1, beta * inputs).
    scaled = [x * 0.25 for x in (pc, pr, rc, rr)]
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, 0.25), dpo_loss(*scaled, 1.0))


def test_only_the_log_ratios_matter() -> None:
    pc, pr, rc, rr = random_logps(7)
    # Adding a constant per example to policy and reference of one side changes nothing.
    shift = torch.linspace(-5, 5, pc.numel(), dtype=pc.dtype)
    torch.testing.assert_close(dpo_loss(pc + shift, pr, rc + shift, rr, 0.1), dpo_loss(pc, pr, rc, rr, 0.1))


def test_gradient_pushes_chosen_up_and_rejected_down() -> None:
    pc, pr, rc, rr = random_logps(8)
    pc = pc.clone().requires_grad_(True)
    pr = pr.clone().requires_grad_(True)
    beta = 0.1
    dpo_loss(pc, pr, rc, rr, beta).sum().backward()
    # d/dpi_w [-log sigma(beta z)] = -beta sigma(-beta z)
    z = ((pc - rc) - (pr - rr)).detach()
    torch.testing.assert_close(pc.grad, -beta * torch.sigmoid(-beta * z))
    torch.testing.assert_close(pr.grad, beta * torch.sigmoid(-beta * z))


def test_large_margins_stay_finite() -> None:
    big = torch.tensor([1e4, -1e4])
    zero = torch.zeros(2)
    loss = dpo_loss(big, zero, zero, zero, beta=1.0)
    assert torch.isfinite(loss).all()
    # -log sigma(1e4) ~ e^-1e4 ~ 0; -log sigma(-1e4) ~ 1e4
    torch.testing.assert_close(loss, torch.tensor([0.0, 1e4]))


def test_implicit_rewards() -> None:
    # beta (log pi - log pi_ref) = 0.1 * (-3 - -5) = 0.2 and 0.1 * (-4 - -1) = -0.3
    out = implicit_rewards(torch.tensor([-3.0, -4.0]), torch.tensor([-5.0, -1.0]), beta=0.1)
    torch.testing.assert_close(out, torch.tensor([0.2, -0.3]))
    # Per token too, and the DPO logit is the chosen minus the rejected implicit reward.
    pc, pr, rc, rr = random_logps(9)
    margin = implicit_rewards(pc, rc, 0.3) - implicit_rewards(pr, rr, 0.3)
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, 0.3), -torch.nn.functional.logsigmoid(margin))
    tokens = torch.randn(2, 5, generator=torch.Generator().manual_seed(1))
    assert implicit_rewards(tokens, torch.zeros(2, 5), 2.0).shape == (2, 5)


@pytest.mark.parametrize("label_smoothing", [-0.1, 0.6])
def test_label_smoothing_out_of_range_raises(label_smoothing: float) -> None:
    zeros = torch.zeros(2)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(zeros, zeros, zeros, zeros, 0.1, label_smoothing)

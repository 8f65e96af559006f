"""KL estimators and controllers against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from equilibrate_pl.algorithms.kl import AdaptiveKLController, FixedKLController, kl_penalty


def test_k1_is_the_log_ratio_and_can_be_negative() -> None:
    lp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    k1 = kl_penalty(lp, ref, "k1")
    assert torch.allclose(k1, torch.tensor([[0.5, -1.0]]))
    assert (k1 < 0).any()  # a token can have negative k1 (docs/PPO.md: negative KL)


def test_k3_matches_formula_and_is_non_negative() -> None:
    torch.manual_seed(0)
    lp, ref = torch.randn(4, 7), torch.randn(4, 7)
    k3 = kl_penalty(lp, ref, "k3")
    expected = [[math.exp(r - l) - 1 - (r - l) for l, r in zip(lr, rr)] for lr, rr in zip(lp.tolist(), ref.tolist())]
    assert torch.allclose(k3, torch.tensor(expected), atol=1e-5)
    assert (k3 >= 0).all()
    assert torch.equal(kl_penalty(lp, lp, "k3"), torch.zeros_like(lp))


def test_k1_and_k3_are_unbiased_for_true_kl() -> None:
    # Sample from p; both estimators average to KL(p || q).
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.2, 0.5, 0.3])
    true_kl = float((p * (p / q).log()).sum())
    g = torch.Generator().manual_seed(0)
    samples = torch.multinomial(p, 200_000, replacement=True, generator=g)
    lp, lq = p.log()[samples][None], q.log()[samples][None]
    assert kl_penalty(lp, lq, "k1").mean().item() == pytest.approx(true_kl, abs=5e-3)
    assert kl_penalty(lp, lq, "k3").mean().item() == pytest.approx(true_kl, abs=5e-3)


def test_bad_estimator_and_shapes() -> None:
    with pytest.raises(ValueError, match="estimator"):
        kl_penalty(torch.zeros(1, 2), torch.zeros(1, 2), "k2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        kl_penalty(torch.zeros(1, 2), torch.zeros(1, 3))


def test_fixed_controller() -> None:
    c = FixedKLController(0.05)
    c.update(10.0, 64)
    assert c.value == 0.05
    d = FixedKLController(1.0)
    d.load_state_dict(c.state_dict())
    assert d.value == 0.05
    with pytest.raises(ValueError):
        FixedKLController(-1)


def test_adaptive_controller_hand_computed() -> None:
    c = AdaptiveKLController(0.1, target=6.0, horizon=100)
    c.update(9.0, 10)  # error = 0.5 -> clipped 0.2; mult = 1 + 0.2 * 10 / 100
    assert c.value == pytest.approx(0.1 * 1.02)
    c.update(5.4, 50)  # error = -0.1; mult = 1 - 0.1 * 0.5
    assert c.value == pytest.approx(0.1 * 1.02 * 0.95)
    c.update(float("nan"), 10)  # ignored
    assert c.value == pytest.approx(0.1 * 1.02 * 0.95)
    restored = AdaptiveKLController(1.0, 1.0, 1)
    restored.load_state_dict(c.state_dict())
    assert restored.state_dict() == c.state_dict()

"""PPO math against loop-based references written here and hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from equilibrate_pl.algorithms.ppo import (
    entropy_from_logits,
    explained_variance,
    gae,
    group_advantages,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    value_loss,
)


def ragged_mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


def gae_loop(rewards, values, lengths, gamma, lam):
    """Textbook GAE one row at a time over the real tokens only."""
    adv = torch.zeros_like(rewards)
    ret = torch.zeros_like(rewards)
    for b, n in enumerate(lengths):
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            last = delta + gamma * lam * last
            adv[b, t] = last
            ret[b, t] = last + values[b, t].item()
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_per_row_loop_on_ragged_batch(gamma: float, lam: float) -> None:
    torch.manual_seed(0)
    lengths = [5, 1, 3, 0, 7]
    rewards, values = torch.randn(5, 7), torch.randn(5, 7)
    mask = ragged_mask(lengths, 7)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_loop(rewards, values, lengths, gamma, lam)
    assert torch.allclose(adv, ref_adv, atol=1e-5)
    assert torch.allclose(ret, ref_ret, atol=1e-5)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_gae_gamma1_lam1_is_reward_to_go_minus_value() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0, 9.0]])
    values = torch.tensor([[0.5, 0.25, 2.0, 9.0]])
    mask = torch.tensor([[True, True, True, False]])
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    assert torch.allclose(adv, torch.tensor([[0.5, 0.75, -1.0, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))


def test_gae_lam0_is_one_step_td() -> None:
    rewards = torch.tensor([[1.0, 2.0]])
    values = torch.tensor([[0.5, 3.0]])
    adv, _ = gae(rewards, values, torch.ones(1, 2, dtype=torch.bool), 0.5, 0.0)
    assert torch.allclose(adv, torch.tensor([[1.0 + 0.5 * 3.0 - 0.5, 2.0 - 3.0]]))


def test_masked_mean_var_whiten() -> None:
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, float("inf"), 5.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    assert masked_mean(x, m).item() == pytest.approx(11 / 4)
    assert torch.allclose(masked_mean(x, m, dim=1), torch.tensor([1.5, 4.0]))
    assert masked_mean(x, m, normalizer=2.0).item() == pytest.approx(5.5)
    real = torch.tensor([1.0, 2.0, 3.0, 5.0])
    assert masked_var(x, m).item() == pytest.approx(real.var().item())
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(real.var(unbiased=False).item())
    w = masked_whiten(x, m)
    assert torch.allclose(w[m], (real - real.mean()) / real.std(), atol=1e-5)
    assert (w[~m] == 0).all()
    w_noshift = masked_whiten(x, m, shift_mean=False)
    assert torch.allclose(w_noshift[m], (real - real.mean()) / real.std() + real.mean(), atol=1e-5)
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0


def policy_loss_loop(lp, old, adv, mask, clip):
    terms, clipped = [], 0
    for b in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            if not mask[b, t]:
                continue
            ratio = math.exp(lp[b, t] - old[b, t])
            a = adv[b, t].item()
            u, c = -a * ratio, -a * min(max(ratio, 1 - clip), 1 + clip)
            terms.append(max(u, c))
            clipped += c > u
    return sum(terms) / len(terms), clipped / len(terms)


def test_policy_loss_matches_loop() -> None:
    torch.manual_seed(1)
    lp, old, adv = torch.randn(3, 6) * 0.3, torch.randn(3, 6) * 0.3, torch.randn(3, 6)
    mask = ragged_mask([6, 2, 4], 6)
    loss, stats = policy_loss(lp, old, adv, mask, clip=0.2)
    ref_loss, ref_clip = policy_loss_loop(lp, old, adv, mask, 0.2)
    assert loss.item() == pytest.approx(ref_loss, abs=1e-5)
    assert stats["clip_fraction"].item() == pytest.approx(ref_clip)
    assert stats["approx_kl"].item() >= 0


def test_policy_loss_at_ratio_one_is_minus_mean_advantage_and_grad() -> None:
    lp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -2.0, 5.0]])
    mask = torch.tensor([[True, True, False]])
    loss, stats = policy_loss(lp, lp.detach(), adv, mask, clip=0.2)
    assert loss.item() == pytest.approx(0.5)  # -(1 - 2) / 2
    loss.backward()
    assert torch.allclose(lp.grad, torch.tensor([[-0.5, 1.0, 0.0]]))
    assert stats["clip_fraction"].item() == 0 and stats["approx_kl"].item() == 0


def test_value_loss_matches_loop() -> None:
    torch.manual_seed(2)
    v, old, ret = torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5)
    mask = ragged_mask([5, 3], 5)
    loss, _ = value_loss(v, old, ret, mask, clip=0.2)
    terms = []
    for b in range(2):
        for t in range(5):
            if mask[b, t]:
                vc = old[b, t] + max(min(v[b, t] - old[b, t], 0.2), -0.2)
                terms.append(max((v[b, t] - ret[b, t]) ** 2, (vc - ret[b, t]) ** 2).item())
    assert loss.item() == pytest.approx(0.5 * sum(terms) / len(terms), abs=1e-6)
    unclipped, _ = value_loss(v, old, ret, mask, clip=None)
    assert unclipped.item() == pytest.approx(0.5 * ((v - ret) ** 2)[mask].mean().item(), abs=1e-6)


def test_entropy_and_explained_variance() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(entropy_from_logits(logits), torch.tensor([math.log(4), 0.0]), atol=1e-5)
    targets = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones_like(targets, dtype=torch.bool)
    assert explained_variance(targets, targets, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(targets, 2.5), targets, mask).item() == pytest.approx(0.0)


def test_group_advantages_grpo_and_rloo_vs_loop() -> None:
    scores = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    grpo = group_advantages(scores, 3, "grpo")
    rloo = group_advantages(scores, 3, "rloo")
    for g in range(2):
        group = scores[3 * g: 3 * g + 3]
        for i in range(3):
            s = group[i].item()
            assert grpo[3 * g + i].item() == pytest.approx((s - group.mean().item()) / (group.std().item() + 1e-4))
            others = [group[j].item() for j in range(3) if j != i]
            assert rloo[3 * g + i].item() == pytest.approx(s - sum(others) / 2)
    assert torch.allclose(group_advantages(scores, 3, "grpo", scale=False), scores - scores.reshape(2, 3).mean(1).repeat_interleave(3))
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(scores, 4)
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(scores, 1)

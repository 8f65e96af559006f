"""PPO for language models as pure torch: GAE, clipped losses, whitening, critic-free advantages.

Layout: every (B, T) tensor is in *response coordinates*: column t is the t-th generated token, and
``mask`` is true on real response tokens (through the EOS, never on padding). A response occupies
a contiguous prefix of its row; GAE treats the first masked-out column after it as the terminal
state.

Losses are masked means. A ``normalizer`` can replace the local token count, so that under data
parallelism every rank divides by the GLOBAL token count and the averaged gradient equals that of
one process holding the whole batch (see ``modules/policy.py``).
"""

from __future__ import annotations

from typing import Literal

import torch

GroupMethod = Literal["grpo", "rloo"]


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` is true (masked entries may hold inf/nan: they are dropped)."""
    masked = torch.where(mask.bool(), values, torch.zeros_like(values))
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(
    values: torch.Tensor,
    mask: torch.Tensor,
    dim: int | None = None,
    normalizer: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Mean over the entries where ``mask`` is true; 0 where there are none.

    ``normalizer`` (only with ``dim=None``) divides the masked sum instead of the local count.
    """
    total = masked_sum(values, mask, dim)
    if normalizer is not None:
        if dim is not None:
            raise ValueError("normalizer is only supported for a full reduction (dim=None)")
        return total / normalizer
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return total / count.clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked entries (Bessel-corrected by default, as TRL and OpenRLHF do)."""
    mean = masked_mean(values, mask)
    n = mask.bool().sum()
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Normalise ``values`` to unit variance (and zero mean if ``shift_mean``) over the mask.

    ``stats = (mean, var)`` lets a distributed caller pass statistics reduced over all ranks.
    Masked-out entries are returned as zero.
    """
    mean, var = stats if stats is not None else (masked_mean(values, mask), masked_var(values, mask))
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016) over masked, ragged responses.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` with ``V`` = 0 past the end of the response, and
    ``A_t = delta_t + gamma * lam * A_{t+1}``; returns are ``A_t + V_t``.

    Args:
        rewards, values: (B, T) per-token rewards and critic values.
        mask: (B, T) true on response tokens (a contiguous run per row).

    Returns:
        ``(advantages, returns)``, each (B, T) float32, zero where ``mask`` is false.
    """
    if not (rewards.shape == values.shape == mask.shape):
        raise ValueError(
            f"shape mismatch: rewards {tuple(rewards.shape)}, values {tuple(values.shape)}, mask {tuple(mask.shape)}"
        )
    m = mask.float()
    r = rewards.float() * m
    v = values.float() * m
    advantages = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    next_value = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        # Multiplying by the mask resets the recursion outside the response: the column after the
        # last real token is terminal, and nothing leaks into the prompt side.
        running = (delta + gamma * lam * running) * m[:, t]
        advantages[:, t] = running
        next_value = v[:, t]
    returns = (advantages + v) * m
    return advantages, returns


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    normalizer: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate loss ``mean_t max(-A r_t, -A clip(r_t, 1-eps, 1+eps))`` over ``mask``.

    Returns ``(loss, stats)``; stats (detached): ``clip_fraction`` (share of masked tokens where the
    clipped branch is active), ``approx_kl`` (k3 estimate of KL(old || new) on masked tokens) and
    ``ratio_mean``.
    """
    log_ratio = logprobs.float() - old_logprobs.float()
    ratio = torch.exp(log_ratio)
    adv = advantages.float()
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask, normalizer=normalizer)
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None,
    normalizer: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss ``0.5 * mean_t max((V - R)^2, (V_clip - R)^2)`` over ``mask``.

    ``V_clip = V_old + clip(V - V_old, -clip, clip)``; ``clip=None`` gives the plain squared error.
    Returns ``(loss, stats)`` with ``value_clip_fraction``.
    """
    v = values.float()
    target = returns.float()
    error = (v - target) ** 2
    if clip is None:
        worst = error
        clip_fraction = torch.zeros((), device=v.device)
    else:
        v_clipped = old_values.float() + torch.clamp(v - old_values.float(), -clip, clip)
        error_clipped = (v_clipped - target) ** 2
        worst = torch.maximum(error, error_clipped)
        with torch.no_grad():
            clip_fraction = masked_mean((error_clipped > error).float(), mask)
    loss = 0.5 * masked_mean(worst, mask, normalizer=normalizer)
    return loss, {"value_clip_fraction": clip_fraction}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) logits -> (...) entropy of the softmax, computed without a (..., V) log-softmax copy."""
    logits = logits.float()
    log_z = torch.logsumexp(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return log_z - (probs * logits).sum(-1)


def explained_variance(predictions: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var[target - prediction] / Var[target]`` over ``mask``: 1 is a perfect critic, <= 0 useless."""
    var_target = masked_var(targets.float(), mask, unbiased=False)
    var_residual = masked_var(targets.float() - predictions.float(), mask, unbiased=False)
    return 1.0 - var_residual / var_target.clamp(min=1e-12)


def group_advantages(
    scores: torch.Tensor, group_size: int, method: GroupMethod = "grpo", eps: float = 1e-4, scale: bool = True
) -> torch.Tensor:
    """Critic-free sequence advantages from several samples per prompt.

    ``scores`` is (N,) with the ``group_size`` samples of each prompt contiguous
    (``[p0s0, p0s1, ..., p1s0, ...]``).

    - ``grpo`` (Shao et al., 2024): ``(s - mean_group) / (std_group + eps)``, unbiased std;
      ``scale=False`` drops the division (Dr. GRPO, Liu et al., 2025);
    - ``rloo`` (Ahmadian et al., 2024): ``s_i - mean of the other samples of the group``.

    Returns (N,) float32.
    """
    if scores.ndim != 1 or scores.numel() % group_size != 0:
        raise ValueError(f"scores must be (N,) with N divisible by group_size={group_size}, got {tuple(scores.shape)}")
    if group_size < 2:
        raise ValueError(f"group advantages need group_size >= 2 samples per prompt, got {group_size}")
    grouped = scores.float().reshape(-1, group_size)
    if method == "grpo":
        adv = grouped - grouped.mean(dim=1, keepdim=True)
        if scale:
            adv = adv / (grouped.std(dim=1, keepdim=True) + eps)
    elif method == "rloo":
        leave_one_out = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
        adv = grouped - leave_one_out
    else:
        raise ValueError(f"method must be 'grpo' or 'rloo', got {method!r}")
    return adv.reshape(-1)

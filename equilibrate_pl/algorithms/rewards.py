"""Reward shaping: dense per-token rewards from prefix scores."""

from __future__ import annotations

import torch


def dense_rewards(prefix_scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards as differences of prefix scores (docs/METHOD.md section 3, ``dense_reward``).

    Args:
        prefix_scores: (B, L) the reward head applied at every position, so entry t is
            ``S(x, y_<=t)``: the score of the sequence cut after token t (one forward pass).
        mask: (B, L) true on response tokens. A response's first token needs a prompt token
            before it, so ``mask[:, 0]`` must be false.

    Returns:
        (B, L) in float32 (float64 for float64 scores): ``S_t - S_{t-1}`` on response tokens, zero
        elsewhere. Over a contiguous response
        the rewards telescope to ``S(last token) - S(end of prompt)``.
    """
    if prefix_scores.shape != mask.shape:
        raise ValueError(f"shape mismatch: scores {tuple(prefix_scores.shape)}, mask {tuple(mask.shape)}")
    mask = mask.bool()
    if mask[:, 0].any():
        rows = mask[:, 0].nonzero()[:, 0].tolist()
        raise ValueError(f"mask[:, 0] is set in rows {rows}: a response token needs a prompt token before it")
    # At least float32: differences of nearby bf16 scores would lose most of their digits.
    scores = prefix_scores.to(torch.promote_types(prefix_scores.dtype, torch.float32))
    previous = torch.cat([torch.zeros_like(scores[:, :1]), scores[:, :-1]], dim=1)
    # where, not multiply: inf/nan scores at padding would survive `* 0` as nan.
    return torch.where(mask, scores - previous, torch.zeros_like(scores))


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Per-pair reward-model loss ``-log sigma(s_w - s_l - margin)`` (Llama-2's margin form when ``margin`` > 0)."""
    return -torch.nn.functional.logsigmoid(chosen_scores - rejected_scores - margin)

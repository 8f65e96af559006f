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


def value_positions(response_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the response tokens plus the token just before the first of them (the end of the
    prompt), i.e. every prefix whose score a dense reward is a difference of."""
    mask = response_mask.bool()
    before = torch.zeros_like(mask)
    before[:, :-1] = mask[:, 1:]
    return mask | before


def prefix_value_loss(prefix_scores: torch.Tensor, response_mask: torch.Tensor, final_scores: torch.Tensor) -> torch.Tensor:
    """Per-row mean squared distance of each prefix score to the row's (detached) final score.

    Bradley-Terry trains a reward model's score at the last token only; the scores of shorter
    prefixes are then whatever the head extrapolates, and their differences (``dense_rewards``)
    alternate sign token by token. Regressing every prefix score, from the end of the prompt on, to
    the sequence's final score makes a prefix score an estimate of the reward the response will get
    (a Monte-Carlo value estimate over the training responses), so a token's dense reward is the
    change it makes to that estimate: large where the response turns (the first words of a refusal
    or of a compliance), near zero where it only continues.

    Args:
        prefix_scores: (B, L) scores of every prefix (``position_scores``), with gradients.
        response_mask: (B, L) true on response tokens (``labels != -100``); ``mask[:, 0]`` false.
        final_scores: (B,) the sequence scores; detached here (they are trained by the pair loss).

    Returns:
        (B,) float32 losses; 0 for a row without response tokens.
    """
    if prefix_scores.shape != response_mask.shape or final_scores.shape != prefix_scores.shape[:1]:
        raise ValueError(f"shapes: scores {tuple(prefix_scores.shape)}, mask {tuple(response_mask.shape)}, "
                         f"final {tuple(final_scores.shape)}")
    where = value_positions(response_mask)
    error = (prefix_scores.float() - final_scores.detach().float().unsqueeze(1)) ** 2
    return torch.where(where, error, torch.zeros_like(error)).sum(1) / where.sum(1).clamp(min=1)

"""Per-token log-probabilities of causal-LM labels."""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-probs of ``labels`` under ``logits``, shifted as causal LMs require.

    Args:
        logits: (B, L, V) model outputs; position t predicts token t + 1.
        labels: (B, L) token ids (values at masked positions are ignored, ``-100`` is fine).
        mask: (B, L) bool/0-1, true on the tokens whose log-prob is wanted.

    Returns:
        (B, L - 1) in float32 (float64 for float64 logits): entry t is
        ``log p(labels[:, t + 1] | tokens <= t) * mask[:, t + 1]``.
    """
    if logits.shape[:2] != labels.shape or labels.shape != mask.shape:
        raise ValueError(f"shape mismatch: logits {tuple(logits.shape)}, labels {tuple(labels.shape)}, "
                         f"mask {tuple(mask.shape)}")
    # At least float32 (bf16/fp16 log-softmax loses ~2 digits); float64 input stays float64.
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    target_mask = mask[:, 1:].bool()
    # -100 (ignore) labels would be out of range for gather; their value is masked out anyway.
    targets = labels[:, 1:].clamp(min=0).unsqueeze(-1)
    # gather - logsumexp avoids materialising a second (B, L, V) tensor as log_softmax would.
    picked = torch.gather(logits, -1, targets).squeeze(-1)
    logps = picked - torch.logsumexp(logits, dim=-1)
    # where, not multiply: inf/nan logits at padding (e.g. fully masked attention rows) would turn
    # into nan under `* 0` and poison the row sums.
    return torch.where(target_mask, logps, torch.zeros_like(logps))


def sequence_logprobs(token_logps: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of per-token log-probs over the kept tokens (token_logps is already zero where masked)."""
    if keep is None:
        return token_logps.sum(-1)
    return (token_logps * keep).sum(-1)

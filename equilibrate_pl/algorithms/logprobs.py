"""Per-token log-probabilities of causal-LM labels."""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable


class _SelectedLogSoftmax(torch.autograd.Function):
    """``log_softmax(logits, -1).gather(-1, targets)``; its backward allocates one logits-sized tensor.

    The logits are the step's largest tensors (V ~ 50k). Autograd's ``gather - logsumexp`` backward
    holds three of that size at once (the softmax, gather's scattered gradient, their sum); this one
    builds ``(onehot - softmax) * grad`` in a single tensor, in place. Measured on the SmolLM2 LoRA
    DPO step: the allocator's peak drops by one logits tensor. (A logsumexp over position slices in
    the forward was tried too: no change in the peak, so it is not done.)
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lse = torch.logsumexp(logits, dim=-1)
        picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(logits, targets, lse)
        return picked - lse

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, targets, lse = ctx.saved_tensors
        grad = grad.unsqueeze(-1)
        # d/dz (z_y - logsumexp z) = onehot(y) - softmax(z)
        out = torch.sub(logits, lse.unsqueeze(-1)).exp_().mul_(-grad)
        out.scatter_add_(-1, targets.unsqueeze(-1), grad)
        return out, None


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-probs of ``labels`` under ``logits``, shifted as causal LMs require.

    Args:
        logits: (B, L, V) model outputs; position t predicts token t + 1.
        labels: (B, L) token ids. Values where ``mask`` is false are never read, so ``-100`` (or a
            pad id) is fine there.
        mask: (B, L) bool or 0/1, true on the tokens whose log-prob is wanted (callers with ``-100``
            labels pass ``labels != -100``).

    Returns:
        (B, L - 1) in float32 (float64 for float64 logits): entry t is
        ``log p(labels[:, t + 1] | tokens <= t)`` where ``mask[:, t + 1]``, else exactly 0.

    Raises:
        ValueError: on mismatched shapes, or a negative label (``-100``) where the mask is true,
            which would otherwise be scored silently as some other token.
    """
    if logits.dim() != 3 or logits.shape[:2] != labels.shape or labels.shape != mask.shape:
        raise ValueError(f"shape mismatch: logits {tuple(logits.shape)} (want B, L, V), labels "
                         f"{tuple(labels.shape)}, mask {tuple(mask.shape)}")
    target_mask = mask[:, 1:].bool()
    targets = labels[:, 1:]
    if (target_mask & (targets < 0)).any():
        rows = sorted(set((target_mask & (targets < 0)).nonzero()[:, 0].tolist()))
        raise ValueError(f"mask is true on negative (ignore) labels in rows {rows}; pass mask = labels != -100")
    # At least float32 (bf16/fp16 log-softmax loses ~2 digits); float64 input stays float64.
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    # Unwanted labels (-100, pad ids) may be out of range for gather; their value is discarded.
    targets = torch.where(target_mask, targets, torch.zeros_like(targets))
    logps = _SelectedLogSoftmax.apply(logits, targets)
    # where, not multiply: inf/nan logits at padding (e.g. fully masked attention rows) would turn
    # into nan under `* 0` and poison the row sums.
    return torch.where(target_mask, logps, torch.zeros_like(logps))


def first_scored_position(mask: torch.Tensor) -> int:
    """The first logit position :func:`token_logprobs` reads for any row of ``mask`` (B, L).

    Logit t scores token t + 1, so this is (the first true ``mask[:, 1:]`` column over all rows);
    ``mask[:, 0]`` is never scored. A model run with ``logits_to_keep = L - first_scored_position(mask)``
    returns every logit the log-probs need (see :func:`tail_token_logprobs`). ``L - 1`` when nothing is
    masked in, so that one logit is still kept. Reads the mask on the host (one device sync).
    """
    scored = mask[:, 1:].bool().any(0)
    if not bool(scored.any()):
        return mask.shape[1] - 1
    return int(scored.int().argmax())


def tail_token_logprobs(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`token_logprobs` from the logits of the LAST K positions only (a causal LM run with
    ``logits_to_keep=K``), in the same full (B, L - 1) layout.

    Args:
        logits: (B, K, V), K <= L: the logits of positions L - K .. L - 1.
        labels, mask: (B, L), as for :func:`token_logprobs`.

    Returns:
        (B, L - 1), entry t = ``log p(labels[:, t + 1] | tokens <= t)`` where ``mask[:, t + 1]``, else 0;
        the entries before position L - K, which these logits cannot score, are 0.

    Raises:
        ValueError: if ``mask`` is true on a token whose logit was not kept (K too small): silently
            zeroing a wanted log-prob would bias every sum.
    """
    if logits.dim() != 3 or logits.shape[0] != labels.shape[0] or not 1 <= logits.shape[1] <= labels.shape[1]:
        raise ValueError(f"shape mismatch: logits {tuple(logits.shape)} (want B, K <= L, V), labels {tuple(labels.shape)}")
    start = labels.shape[1] - logits.shape[1]
    if start == 0:
        return token_logprobs(logits, labels, mask)
    if mask[:, 1 : start + 1].bool().any():
        raise ValueError(f"logits start at position {start} but the mask wants tokens at or before it; "
                         f"keep at least {labels.shape[1] - first_scored_position(mask)} positions")
    tail = token_logprobs(logits, labels[:, start:], mask[:, start:])  # entry t here is entry start + t
    return torch.nn.functional.pad(tail, (start, 0))


def sequence_logprobs(token_logps: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) sum of per-token log-probs over the kept tokens.

    ``token_logps`` comes from :func:`token_logprobs`, already zero off the response, so ``keep=None``
    sums the whole response. ``keep`` (B, L - 1) is an AMA mask (a subset of the response tokens).
    """
    if keep is None:
        return token_logps.sum(-1)
    return (token_logps * keep).sum(-1)

"""Next-token choice from a row of logits: greedy, or an exact draw under temperature / top-k / top-p.

``torch.multinomial`` draws one exponential random number per vocabulary entry (the exponential
race), which on CPU costs ~8 ms for 8 rows of a 49k vocabulary, more than the rest of the
sampling step together. An inverse-CDF draw needs ONE uniform per row: the sampled token is the
first whose cumulative probability exceeds ``u * total``. Summing in float64 makes it exact to
~1e-16 per token (float32 cumulative sums over 49k entries would shift small probabilities by up
to ~1e-3 of their value, hence float64), and a two-level search keeps the float64 work small: the
mass of each block of 256 entries, a search over the blocks, then a cumulative sum inside the one
block drawn.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["filter_logits", "inverse_cdf_sample", "next_tokens"]

_BLOCK = 256


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(B, V) scores of the sampling distribution: ``logits / temperature``, then transformers'
    top-k and top-p warpers (``top_k=0`` / ``top_p=1`` disable them), in ``generate``'s order."""
    scores = logits / temperature if temperature != 1.0 else logits
    if top_k:
        from transformers.generation.logits_process import TopKLogitsWarper

        scores = TopKLogitsWarper(top_k=top_k)(None, scores)
    if top_p < 1.0:
        from transformers.generation.logits_process import TopPLogitsWarper

        scores = TopPLogitsWarper(top_p=top_p)(None, scores)
    return scores


def _last_positive(mass: torch.Tensor) -> torch.Tensor:
    """(B, 1) index of the last entry > 0 of each row of ``mass`` (B, N)."""
    n = mass.shape[-1]
    return (n - 1 - (mass > 0).flip(-1).int().argmax(-1, keepdim=True)).long()


def inverse_cdf_sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) one index per row drawn with probability ``probs[b, i] / probs[b].sum()``.

    One float64 uniform per row from ``generator`` (the global generator by default). A zero
    probability is never drawn: float64 rounding at a block edge (odds ~1e-16) is resolved towards
    the last entry with mass, never past it.
    """
    rows, width = probs.shape
    pad = (-width) % _BLOCK
    blocks = (F.pad(probs, (0, pad)) if pad else probs).view(rows, -1, _BLOCK)
    mass = blocks.sum(-1, dtype=torch.float64)  # (B, blocks)
    cum = mass.cumsum(-1)
    u = torch.rand(rows, 1, dtype=torch.float64, device=probs.device, generator=generator) * cum[:, -1:]
    block = torch.minimum(torch.searchsorted(cum, u, right=True), _last_positive(mass))
    rest = u - (cum.gather(1, block) - mass.gather(1, block))  # position inside the drawn block
    inner = blocks[torch.arange(rows, device=probs.device), block.squeeze(1)].double()  # (B, 256)
    index = torch.minimum(torch.searchsorted(inner.cumsum(-1), rest.clamp(min=0), right=True), _last_positive(inner))
    return (block * _BLOCK + index).squeeze(1)


def next_tokens(
    logits: torch.Tensor, do_sample: bool, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B,) next tokens from the last position's (B, V) logits: the argmax, or a draw from
    ``softmax(filter_logits(logits))`` (:func:`inverse_cdf_sample`)."""
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(filter_logits(logits.float(), temperature, top_k, top_p), dim=-1)
    return inverse_cdf_sample(probs, generator)

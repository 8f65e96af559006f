"""Adaptive Message-wise Alignment: masks that keep only the key tokens of each response.

docs/METHOD.md section 3. A good response (chosen / non-negative advantage) keeps tokens whose signal is
above the baseline, a bad one keeps tokens below it. Padding is never kept. A row whose mask would
be empty falls back to its full mask, so every response still contributes; callers log how often.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar, Literal, NamedTuple, Union

import torch

Baseline = Union[Literal["zero", "batch_mean"], float]


class AMAMasks(NamedTuple):
    """Result of :func:`adpo_masks`; unpacks as ``(chosen_keep, rejected_keep)``."""

    chosen_keep: torch.Tensor
    rejected_keep: torch.Tensor


def _check_shapes(**tensors: torch.Tensor) -> None:
    """All (B, T) with one shape; broadcasting a mismatch would silently select the wrong tokens."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if any(len(shape) != 2 for shape in shapes.values()) or len(set(shapes.values())) != 1:
        raise ValueError(f"expected (batch, tokens) tensors of one shape, got shapes {shapes}")


def baseline_value(baseline: Baseline, signals: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
    """The scalar baseline b: 0, a given number, or the mean signal over every real token given.

    b is computed in at least float32 (float64 when a signal is float64), so that a mean of bf16
    signals is not rounded back onto the bf16 grid, where it could tie with the signals themselves.
    """
    dtype = functools.reduce(torch.promote_types, [s.dtype for s in signals], torch.float32)
    device = signals[0].device
    if baseline == "zero":
        return torch.zeros((), dtype=dtype, device=device)
    if baseline == "batch_mean":
        # where, not multiply: inf/nan at padding would survive `* 0` as nan.
        total = sum(torch.where(m.bool(), s.to(dtype), 0.0).sum() for s, m in zip(signals, masks))
        count = sum(m.bool().sum() for m in masks)
        # An all-padding batch has no tokens to keep; any baseline gives the same (empty) masks.
        return total / count.clamp(min=1)
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.tensor(float(baseline), dtype=dtype, device=device)
    raise ValueError(f"baseline must be 'zero', 'batch_mean' or a number, got {baseline!r}")


def keep_tokens(
    signal: torch.Tensor, mask: torch.Tensor, b: torch.Tensor, above: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep real tokens with signal > b in rows where ``above`` (B,) is true, signal < b elsewhere.

    Ties (signal == b) are never kept. Returns ``(keep, fallback)``: the (B, T) bool mask and a (B,)
    bool flag of rows whose selection was empty although the row had real tokens, which therefore
    keep their full mask.
    """
    b = torch.as_tensor(b, device=signal.device)
    # Compare at the wider precision: a 0-dim float32 b against a bf16 signal would otherwise be
    # rounded to bf16 by type promotion before the comparison.
    signal = signal.to(torch.promote_types(signal.dtype, b.dtype))
    mask = mask.bool()
    above = above.bool().reshape(-1, 1)
    selected = torch.where(above, signal > b, signal < b) & mask
    fallback = ~selected.any(dim=1) & mask.any(dim=1)
    keep = torch.where(fallback.unsqueeze(1), mask, selected)
    return keep, fallback


def adpo_masks(
    chosen_signal: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_signal: torch.Tensor,
    rejected_mask: torch.Tensor,
    baseline: Baseline = "zero",
    return_fallbacks: bool = False,
) -> AMAMasks | tuple[AMAMasks, torch.Tensor, torch.Tensor]:
    """ADPO masks: chosen tokens with signal > b, rejected tokens with signal < b.

    Args:
        chosen_signal, rejected_signal: (B, Tc) / (B, Tr) per-token signals r_t; values at padding
            are never read (any junk, inf or nan is fine there).
        chosen_mask, rejected_mask: same shapes, true on real response tokens.
        baseline: ``"zero"``, ``"batch_mean"`` (the mean signal over all real tokens of chosen AND
            rejected together) or a number.
        return_fallbacks: also return the (B,) bool flags of rows whose selection was empty and
            which therefore keep their full mask (log their count).

    Returns:
        ``AMAMasks(chosen_keep, rejected_keep)`` of bool (B, T) masks, subsets of the given masks;
        with ``return_fallbacks``, ``(masks, chosen_fallback, rejected_fallback)``.
    """
    _check_shapes(chosen_signal=chosen_signal, chosen_mask=chosen_mask)
    _check_shapes(rejected_signal=rejected_signal, rejected_mask=rejected_mask)
    if chosen_signal.shape[0] != rejected_signal.shape[0]:
        raise ValueError(
            f"chosen and rejected batch sizes differ: {chosen_signal.shape[0]} vs {rejected_signal.shape[0]}"
        )
    b = baseline_value(baseline, [chosen_signal, rejected_signal], [chosen_mask, rejected_mask])
    above = torch.ones(chosen_signal.shape[0], dtype=torch.bool, device=chosen_signal.device)
    chosen_keep, chosen_fb = keep_tokens(chosen_signal, chosen_mask, b, above)
    rejected_keep, rejected_fb = keep_tokens(rejected_signal, rejected_mask, b, ~above)
    masks = AMAMasks(chosen_keep, rejected_keep)
    return (masks, chosen_fb, rejected_fb) if return_fallbacks else masks


def sequence_advantage(advantages: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """(B,) the advantage at each row's first response token (0 for a row with no response).

    The first response token need not be column 0: left-padded rows start mid-row.
    """
    mask = action_mask.bool()
    first = mask.int().argmax(dim=1)  # argmax returns the first maximal index
    values = advantages.gather(1, first.unsqueeze(1)).squeeze(1)
    return torch.where(mask.any(dim=1), values, torch.zeros_like(values))


def appo_mask(
    advantages: torch.Tensor,
    token_signal: torch.Tensor,
    action_mask: torch.Tensor,
    baseline: Baseline = "zero",
    return_fallbacks: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """APPO mask ``M_t = m_t (1[A >= 0] 1[r_t > b] + 1[A < 0] 1[r_t < b])``.

    Args:
        advantages: (B, T) per-token advantages; a row's sequence-level advantage A is its value at
            the row's first response token (with GAE and gamma = lambda = 1 that is the whole
            response's return minus the first value; for GRPO/RLOO every token holds A). A = 0
            counts as non-negative.
        token_signal: (B, T) per-token signal r_t (critic values, dense rewards, ...).
        action_mask: (B, T) true on real response tokens.
        baseline: ``"zero"``, ``"batch_mean"`` (mean of r_t over the real tokens of the batch) or a
            number (e.g. a mean already reduced across ranks).
        return_fallbacks: also return the (B,) flags of rows that kept their full mask because the
            selection was empty.

    Returns:
        The bool (B, T) mask, or ``(mask, fallback)`` with ``return_fallbacks``.
    """
    _check_shapes(advantages=advantages, token_signal=token_signal, action_mask=action_mask)
    b = baseline_value(baseline, [token_signal], [action_mask])
    positive = sequence_advantage(advantages, action_mask) >= 0
    keep, fallback = keep_tokens(token_signal, action_mask, b, positive)
    return (keep, fallback) if return_fallbacks else keep


def kept_fraction(keep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of real tokens kept by an AMA mask: a 0-dim float32 logging statistic (0 if no tokens)."""
    return keep.sum().float() / mask.bool().sum().clamp(min=1).float()


# --------------------------------------------------------------------------------------------
# Settings: one concept, the signals each stage can use


@dataclass
class AMASettings:
    """The AMA mask's switches; ``enabled=False`` is plain PPO / DPO.

    Args:
        enabled: apply the mask.
        token_signal: where r_t comes from; each stage allows its own (:class:`APPOSettings`,
            :class:`ADPOSettings`): ``value`` (the critic's V_t), ``dense_reward`` (differences of a
            reward model's prefix scores), ``implicit`` (beta*(log pi* - log pi_ref) per token of a
            FROZEN model pi*, never the policy being trained) or ``field`` (a per-token column of
            the data). The signal must come from outside the loss it steers: a mask computed from
            the trained policy's own log-ratio keeps exactly the tokens that moved the right way, so
            any movement lowers the loss whatever the labels (docs/METHOD.md, section 3).
        baseline: ``zero`` or ``batch_mean`` (mean signal over every real response token of the
            batch; for ADPO chosen and rejected together).
    """

    SIGNALS: ClassVar[tuple[str, ...]] = ("dense_reward",)

    enabled: bool = False
    token_signal: str = "dense_reward"
    baseline: Literal["zero", "batch_mean"] = "zero"

    def __post_init__(self) -> None:
        if self.token_signal not in self.SIGNALS:
            raise ValueError(f"ama.token_signal must be one of {list(self.SIGNALS)} here, got {self.token_signal!r}")
        if self.baseline not in ("zero", "batch_mean"):
            raise ValueError(f"ama.baseline must be zero or batch_mean, got {self.baseline!r}")


@dataclass
class APPOSettings(AMASettings):
    """AMA for PPO: ``value`` (the authors' choice) or ``dense_reward`` (what critic-free GRPO/RLOO
    need)."""

    SIGNALS: ClassVar[tuple[str, ...]] = ("value", "dense_reward")

    token_signal: Literal["value", "dense_reward"] = "value"


@dataclass
class ADPOSettings(AMASettings):
    """AMA for DPO: ``dense_reward`` (the paper's: a reward model's token rewards; needs
    ``reward_model``), ``implicit`` (a frozen DPO model's token rewards; needs ``implicit_model``)
    or ``field``."""

    SIGNALS: ClassVar[tuple[str, ...]] = ("dense_reward", "implicit", "field")

    token_signal: Literal["dense_reward", "implicit", "field"] = "dense_reward"

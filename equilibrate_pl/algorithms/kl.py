"""KL penalty against the reference policy: per-token estimators and coefficient controllers.

The penalty enters the per-token reward, ``r_t = -beta * kl_t`` (plus the score on the last token),
as in Ziegler et al. (2019) and every PPO-for-LMs library since. Estimators (Schulman, "Approximating
KL divergence", 2020), with ``log_ratio = log pi(y_t) - log pi_ref(y_t)`` on the sampled token:

- ``k1 = log_ratio``: unbiased, but a single token can be negative (docs/PPO.md: negative KL), so a batch mean
  can look like "negative KL";
- ``k3 = exp(-log_ratio) - 1 + log_ratio``: unbiased for KL(pi || pi_ref) under samples from pi
  and never negative, with lower variance than k1 when the policies are close.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

KLEstimator = Literal["k1", "k3"]


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token KL estimate of the policy against the reference on the sampled tokens.

    Args:
        logprobs: (B, T) log pi(y_t) of the sampled tokens (zero where masked is fine).
        ref_logprobs: (B, T) log pi_ref(y_t), same layout.
        estimator: ``"k1"`` (can be negative per token) or ``"k3"`` (non-negative).

    Returns:
        (B, T) float32; callers mask it.
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"shape mismatch: logprobs {tuple(logprobs.shape)}, ref {tuple(ref_logprobs.shape)}")
    log_ratio = logprobs.float() - ref_logprobs.float()
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        # expm1 keeps precision when the ratio is close to 1 (the usual case early in training).
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"estimator must be 'k1' or 'k3', got {estimator!r}")


class FixedKLController:
    """A constant KL coefficient (with ``state_dict`` so both controllers checkpoint alike)."""

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient is fixed."""

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive coefficient of Ziegler et al. (2019), "Fine-Tuning LMs from Human Preferences".

    After each batch, ``beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon)``:
    the coefficient grows while the measured KL is above ``target`` and shrinks while below, by at
    most 20% per ``horizon`` samples. ``current_kl`` is the mean per-sequence KL (sum over tokens).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if init_kl_coef <= 0 or target <= 0 or horizon <= 0:
            raise ValueError(
                f"adaptive KL needs init_kl_coef, target and horizon > 0, got {init_kl_coef}, {target}, {horizon}"
            )
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        if not math.isfinite(current_kl):
            return  # a non-finite batch is skipped by the caller; it must not poison the coefficient
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = int(state["horizon"])

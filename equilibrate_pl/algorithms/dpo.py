"""Direct Preference Optimisation (Rafailov et al., 2023), sigmoid form."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-example sigmoid DPO loss ``-log sigma(beta * [(pi_w - ref_w) - (pi_l - ref_l)])``.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: (B,)
            sequence log-prob sums (for ADPO, the sums over the AMA-kept tokens, policy and
            reference masked alike).
        beta: inverse temperature of the implicit reward.
        label_smoothing: the conservative-DPO (cDPO) preference-noise rate eps in [0, 0.5]:
            ``-(1 - eps) log sigma(beta z) - eps log sigma(-beta z)``; 0 gives plain DPO.

    Returns:
        (B,) losses; the caller takes the mean.
    """
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    logits = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    loss = -F.logsigmoid(beta * logits) * (1.0 - label_smoothing)
    if label_smoothing:
        loss = loss - F.logsigmoid(-beta * logits) * label_smoothing
    return loss


def implicit_rewards(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's implicit reward ``beta * (log pi - log pi_ref)``; works per sequence or per token."""
    return beta * (policy_logps - ref_logps)

"""Process-group helpers shared by the data and module layers (torch only, no Lightning import).

Reductions: every statistic that defines an update (whitening, the batch-mean AMA baseline, loss
normalisers, the KL fed to the adaptive controller) is taken over ALL ranks, so N processes
compute the update of one process holding the global batch. On one process each is the local value.

Clean-up at exit: Lightning destroys the default process group at exit only for NCCL
(``lightning.fabric.utilities.distributed._init_dist_connection``). A gloo group left alive is
torn down during interpreter finalization instead, while its C++ worker threads may still hold
work objects; the process then dies with ``terminate called without an active exception``
(SIGABRT) *after* training finished (pytorch/pytorch#179291, #190489). Under ``ddp_spawn`` the
launcher reports that as a failed run. Destroying the group from an ``atexit`` handler, while the
interpreter is still whole, avoids it. ``destroy_process_group`` is local for gloo and a no-op once
the group is gone, so calling it after a user already did is harmless.
"""

from __future__ import annotations

import atexit
from typing import Any

import torch

from equilibrate_pl.algorithms.ppo import explained_variance

_registered = False


def is_multi_process() -> bool:
    """Whether a default process group with more than one rank exists."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return torch.distributed.get_world_size() if is_multi_process() else 1


def rank() -> int:
    return torch.distributed.get_rank() if is_multi_process() else 0


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """A float32 copy of ``t`` summed over ranks (detached)."""
    t = t.detach().clone().float()
    if is_multi_process():
        torch.distributed.all_reduce(t)
    return t


def all_ranks_agree(flag: bool, device: torch.device | str | None = None) -> bool:
    """Whether ``flag`` is true on every rank: for a data-dependent choice of forward path, which
    every rank must take alike when each forward all-gathers (FSDP)."""
    if not is_multi_process():
        return flag
    return int(all_sum(torch.tensor(float(flag), device=device)).item()) == world_size()


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` on one process)."""
    if not is_multi_process():
        return [obj]
    gathered: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def global_masked_stats(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, unbiased var) of ``values`` over ``mask`` on every rank together."""
    m = mask.bool()
    v = torch.where(m, values.float(), torch.zeros_like(values, dtype=torch.float32))
    s = all_sum(torch.stack([v.sum(), (v * v).sum(), m.sum().float()]))
    n = s[2].clamp(min=1)
    mean = s[0] / n
    var = (s[1] / n - mean**2).clamp(min=0) * n / (n - 1).clamp(min=1)
    return mean, var


def global_explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``algorithms.ppo.explained_variance`` over every rank's rows."""
    if not is_multi_process():
        return explained_variance(values, returns, mask)
    _, var_t = global_masked_stats(returns, mask)
    _, var_r = global_masked_stats(returns - values, mask)
    return 1.0 - var_r / var_t.clamp(min=1e-12)


def _destroy_default_group() -> None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def destroy_process_group_at_exit() -> None:
    """Register (once per process) an exit handler that destroys the default process group.

    Call it from a hook that runs on every rank after the group exists (``setup``). Groups using
    NCCL are skipped: Lightning already registers the same clean-up for them.
    """
    global _registered
    dist = torch.distributed
    if _registered or not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "nccl":
        return
    atexit.register(_destroy_default_group)
    _registered = True

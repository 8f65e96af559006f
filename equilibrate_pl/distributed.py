"""Process-group helpers shared by the data and module layers (torch only, no Lightning import).

Lightning destroys the default process group at exit only for NCCL
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

import torch

_registered = False


def is_multi_process() -> bool:
    """Whether a default process group with more than one rank exists."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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

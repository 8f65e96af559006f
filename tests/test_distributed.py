"""The exit-time process-group clean-up (equilibrate_pl.distributed)."""

from __future__ import annotations

import atexit
import socket
from types import SimpleNamespace

import pytest
import torch.distributed as dist

import equilibrate_pl.distributed as eqdist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> list:
    handlers: list = []
    monkeypatch.setattr(atexit, "register", handlers.append)
    monkeypatch.setattr(eqdist, "_registered", False)
    yield handlers
    if dist.is_initialized():
        dist.destroy_process_group()


def test_gloo_group_is_destroyed_by_the_exit_handler_registered_once(registered):
    eqdist.destroy_process_group_at_exit()
    assert registered == []  # no group yet: nothing to clean up
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    eqdist.destroy_process_group_at_exit()
    eqdist.destroy_process_group_at_exit()
    assert len(registered) == 1
    registered[0]()
    assert not dist.is_initialized()
    registered[0]()  # a user who already destroyed the group: still fine


def test_nccl_is_left_to_lightning(registered, monkeypatch):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "nccl")
    eqdist.destroy_process_group_at_exit()
    assert registered == []


def test_every_training_stage_registers_the_clean_up_in_setup(registered):
    from equilibrate_pl.modules import PreferenceModule, RewardModule, SFTModule
    from equilibrate_pl.modules.policy import PolicyModule

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    for cls in (SFTModule, RewardModule, PreferenceModule):
        eqdist._registered = False
        cls.setup(object.__new__(cls), "fit")  # the hook alone: no model is built
        assert registered.count(eqdist._destroy_default_group) == 1, cls.__name__
        registered.clear()
    # PolicyModule.setup also checks the strategy and precision: a stand-in trainer with those.
    policy = object.__new__(PolicyModule)
    object.__setattr__(policy, "_trainer", SimpleNamespace(strategy=object(), world_size=1, precision="32-true"))
    object.__setattr__(policy, "_fabric", None)
    eqdist._registered = False
    PolicyModule.setup(policy, "fit")
    assert registered.count(eqdist._destroy_default_group) == 1

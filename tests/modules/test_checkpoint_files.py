"""Checkpoint files after a kill (issue 12, item 9): the temporary a killed save leaves behind is
removed by the next save, and checkpoints get the permissions the umask gives."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from equilibrate_pl.modules.common import AtomicCheckpointIO

# Pickling `Bomb` SIGKILLs the process half-way through writing the checkpoint.
KILLED_SAVE = """
import os, signal, sys, torch
from equilibrate_pl.modules.common import atomic_torch_save
class Bomb:
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)
atomic_torch_save({"weights": torch.zeros(1 << 20), "bomb": Bomb()}, sys.argv[1])
"""


def _kill_a_save(path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(path)], env=env, capture_output=True, timeout=300)
    assert run.returncode == -9, run.stderr[-2000:]


def test_a_killed_save_leaves_a_temporary_that_the_next_save_removes(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)
    _kill_a_save(target)
    _kill_a_save(target)
    leftovers = [p for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert len(leftovers) == 1  # the second save removed the first one's leftover: they do not pile up ...
    assert torch.load(target, weights_only=True) == {"step": 1}  # ... next to an intact checkpoint
    unrelated = tmp_path / ".last.ckpt.backup"
    unrelated.write_text("not ours")
    AtomicCheckpointIO().save_checkpoint({"step": 2}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".last.ckpt.backup", "last.ckpt"]
    assert torch.load(target, weights_only=True) == {"step": 2}


def test_checkpoints_get_the_umask_permissions(tmp_path: Path) -> None:
    target = tmp_path / "step=1.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_temporary_of_a_live_writer_is_left_alone(tmp_path: Path) -> None:
    """Only dead writers' temporaries go: a process still writing the same target keeps its file."""
    target = tmp_path / "last.ckpt"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".last.ckpt.{sleeper.pid}-0123abcd.tmp.ckpt"
        live.write_bytes(b"half written")
        AtomicCheckpointIO().save_checkpoint({"step": 1}, target)
        assert live.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    AtomicCheckpointIO().save_checkpoint({"step": 2}, target)
    assert not live.exists()

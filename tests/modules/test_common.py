"""Shared training pieces: non-finite guard, atomic checkpoints, RNG resume, tokenizer checks."""

from __future__ import annotations

import io
import random
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from equilibrate_pl.modules.common import (
    AtomicCheckpointIO,
    NonFiniteGuard,
    OptimSettings,
    RNGStateCallback,
    capture_rng_state,
    check_tokenizers_match,
    coerce_settings,
    group_means,
    parameter_groups,
    plain,
    restore_rng_state,
)


def test_guard_skips_then_raises_after_n_in_a_row(caplog: pytest.LogCaptureFixture) -> None:
    guard = NonFiniteGuard(max_consecutive=3)
    assert guard.check(torch.tensor(1.0))
    assert not guard.check(torch.tensor(float("nan")), step=4)
    assert "non-finite loss at step 4" in caplog.text
    assert not guard.check(torch.tensor(float("inf")))
    assert guard.check(torch.tensor(0.5))  # a finite loss resets the streak
    assert guard.state_dict() == {"consecutive": 0, "total_skipped": 2}
    assert not guard.check(torch.tensor(float("nan")))
    assert not guard.check(torch.tensor(float("nan")))
    with pytest.raises(RuntimeError, match="3 steps in a row"):
        guard.check(torch.tensor(float("nan")))


def test_guard_state_round_trip_and_sync() -> None:
    guard = NonFiniteGuard(2)
    guard.check(torch.tensor(float("nan")))
    restored = NonFiniteGuard(2)
    restored.load_state_dict(guard.state_dict())
    with pytest.raises(RuntimeError):
        restored.check(torch.tensor(float("nan")))
    # Another rank saw a NaN: the max-reduction makes this rank skip too.
    assert not NonFiniteGuard(5).check(torch.tensor(1.0), sync=lambda t: torch.ones_like(t))


def test_atomic_checkpoint_round_trip_weights_only(tmp_path: Path) -> None:
    io_ = AtomicCheckpointIO()
    ckpt = {"state_dict": {"w": torch.arange(3.0)}, "hyper_parameters": {"a": [1, 2], "b": None}, "rng": capture_rng_state()}
    path = tmp_path / "sub" / "last.ckpt"
    io_.save_checkpoint(ckpt, path)
    loaded = io_.load_checkpoint(path)
    assert torch.equal(loaded["state_dict"]["w"], ckpt["state_dict"]["w"])
    assert loaded["hyper_parameters"] == {"a": [1, 2], "b": None}
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temp file left


def test_interrupted_write_keeps_the_old_checkpoint(tmp_path: Path) -> None:
    io_ = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io_.save_checkpoint({"step": 1}, path)

    def crash(obj, f):  # a write that dies half way (disk full, job killed)
        f.write(b"partial")
        raise KeyboardInterrupt

    with mock.patch("equilibrate_pl.modules.common.torch.save", crash), pytest.raises(KeyboardInterrupt):
        io_.save_checkpoint({"step": 2}, path)
    assert io_.load_checkpoint(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


class _Custom:
    pass


def test_checkpoint_with_arbitrary_objects_is_refused_unless_trusted(tmp_path: Path) -> None:
    path = tmp_path / "x.ckpt"
    torch.save({"obj": _Custom()}, path)
    with pytest.raises(RuntimeError, match="weights_only=True"):
        AtomicCheckpointIO().load_checkpoint(path)
    assert isinstance(AtomicCheckpointIO(trusted=True).load_checkpoint(path)["obj"], _Custom)


def test_rng_state_round_trip_through_weights_only_file() -> None:
    state = capture_rng_state()
    buf = io.BytesIO()
    torch.save(state, buf)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    buf.seek(0)
    restore_rng_state(torch.load(buf, weights_only=True))
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[0] == again[0] and expected[1] == again[1] and torch.equal(expected[2], again[2])


def test_rng_callback_isolates_training_stream() -> None:
    """What runs between steps (validation, a new DataLoader) must not shift the training stream."""
    cb = RNGStateCallback()
    torch.manual_seed(0)
    cb.on_train_start(None, None)  # type: ignore[arg-type]
    cb.on_train_batch_start(None, None, None, 0)  # type: ignore[arg-type]
    first = torch.rand(2)
    cb.on_train_batch_end(None, None, None, None, 0)  # type: ignore[arg-type]
    saved = cb.state_dict()
    torch.rand(100)  # e.g. validation between steps
    cb.on_train_batch_start(None, None, None, 1)  # type: ignore[arg-type]
    second = torch.rand(2)

    resumed = RNGStateCallback()
    resumed.load_state_dict(saved)
    torch.manual_seed(123)
    resumed.on_train_start(None, None)  # type: ignore[arg-type]  # must not overwrite the loaded stream
    resumed.on_train_batch_start(None, None, None, 1)  # type: ignore[arg-type]
    assert torch.equal(torch.rand(2), second)
    assert not torch.equal(first, second)


def test_tokenizer_mismatch_is_a_clear_error(equilibrate_cache: Path) -> None:
    from equilibrate_pl.data.tokenizer import tiny_tokenizer

    a = tiny_tokenizer()
    check_tokenizers_match(a, tiny_tokenizer())
    b = tiny_tokenizer()
    b.add_tokens(["<|extra|>"])
    with pytest.raises(ValueError, match=r"policy and reward model tokenizers do not match[\s\S]*only in reward model"):
        check_tokenizers_match(a, b)
    c = tiny_tokenizer()
    c.pad_token = c.eos_token
    with pytest.raises(ValueError, match="pad_token"):
        check_tokenizers_match(a, c, names=("actor", "critic"))


def test_parameter_groups_decay_only_matrices() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model[1].requires_grad_(False)
    groups = parameter_groups(model, weight_decay=0.1)
    assert [len(g["params"]) for g in groups] == [1, 1]  # weight decayed; bias not; frozen norm absent
    assert groups[0]["params"][0] is model[0].weight and groups[0]["weight_decay"] == 0.1
    with pytest.raises(ValueError, match="no trainable"):
        parameter_groups(torch.nn.Linear(2, 2).requires_grad_(False), 0.0)


def test_settings_coercion_and_plain() -> None:
    optim = coerce_settings(OptimSettings, {"lr": 0.1, "betas": [0.8, 0.9]})
    assert optim.betas == (0.8, 0.9)
    assert plain({"o": optim})["o"]["betas"] == [0.8, 0.9]
    with pytest.raises(ValueError, match="unknown OptimSettings field"):
        coerce_settings(OptimSettings, {"learning_rate": 1.0})


def test_group_means_against_loop() -> None:
    values = torch.tensor([1.0, 2.0, 3.0, 5.0])
    groups = ["EHD", "general", "EHD", "IHD"]
    got = {g: (float(m), n) for g, (m, n) in group_means(values, groups).items()}
    assert got == {"EHD": (2.0, 2), "general": (2.0, 1), "IHD": (5.0, 1)}

"""Pieces every training stage shares: model and optimizer settings, the non-finite-loss guard,
atomic checkpoint files, exact RNG resume, tokenizer checks and per-group logging.

Each piece is a small class or function that a LightningModule composes; none of them is a base
class a stage must inherit from.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pickle
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.io import TorchCheckpointIO

from equilibrate_pl.distributed import destroy_process_group_at_exit
from equilibrate_pl.files import atomic_torch_save, atomic_write_json, fsync_directory, remove_stale_temporaries, temporary_path
from equilibrate_pl.models.loading import LoraSettings, QuantSettings

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass
class ModelSettings:
    """Which model to load and how (mapped onto :func:`equilibrate_pl.models.load_causal_lm`).

    Args:
        name_or_path: ``"builtin:tiny"``, ``"builtin:smollm2"``, a hub id or a local directory (a LoRA
            adapter directory is merged into its base on load).
        dtype: weight dtype (``float32``, ``bfloat16``, ``float16``). Mixed precision is the
            Trainer's ``precision``; this is the storage dtype.
        lora: LoRA adapter settings (``equilibrate_pl.models.LoraSettings`` fields) or ``None`` for a
            full fine-tune.
        quant: bitsandbytes settings (``equilibrate_pl.models.QuantSettings`` fields) for a 4/8-bit
            frozen base; with ``lora`` this is QLoRA.
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% slower).
        trust_remote_code: run model code from the hub; off unless you trust the repository.
    """

    name_or_path: str = "builtin:tiny"
    dtype: str = "float32"
    lora: LoraSettings | None = None
    quant: QuantSettings | None = None
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        self.lora = _coerce(LoraSettings, self.lora)
        self.quant = _coerce(QuantSettings, self.quant)

    def loader_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``load_causal_lm`` / ``load_scalar_model``."""
        return dict(
            dtype=self.dtype,
            lora=self.lora,
            quant=self.quant,
            gradient_checkpointing=self.gradient_checkpointing,
            trust_remote_code=self.trust_remote_code,
        )


@dataclass
class OptimSettings:
    """AdamW with a warm-up then decay schedule, stepped every optimizer step.

    Args:
        lr: peak learning rate.
        weight_decay: decoupled weight decay, applied to matrices only (not biases, norms).
        betas, eps: AdamW moments.
        warmup_steps: linear warm-up length; ``warmup_ratio`` (of the total steps) is used if > 0.
        scheduler: any ``transformers.get_scheduler`` name (``cosine``, ``linear``, ``constant``,
            ``constant_with_warmup``, ...).
    """

    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    scheduler: str = "cosine"

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        self.betas = tuple(self.betas)  # type: ignore[assignment]  # YAML gives a list


def _coerce(cls: type, value: Any) -> Any:
    """A dataclass from ``value`` (an instance, a dict, or ``None``)."""
    if value is None or isinstance(value, cls):
        return value
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if not isinstance(value, Mapping):
        raise TypeError(f"expected {cls.__name__} or a mapping of its fields, got {type(value).__name__}")
    unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {sorted(unknown)}; valid: {[f.name for f in dataclasses.fields(cls)]}")
    return cls(**value)


def coerce_settings(cls: type, value: Any) -> Any:
    """Public form of :func:`_coerce`: modules accept settings as dataclasses or plain dicts
    (a checkpoint stores them as dicts so that it loads with ``torch.load(weights_only=True)``)."""
    return _coerce(cls, value)


def plain(value: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists, recursively: what a weights-only checkpoint can hold."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def module_class_path(module: LightningModule) -> str:
    """``package.module.Class`` of a LightningModule, stored in checkpoints for ``equilibrate export``."""
    return f"{type(module).__module__}.{type(module).__qualname__}"


def save_plain_hyperparameters(module: LightningModule, **hparams: Any) -> None:
    """``module.save_hyperparameters`` with every dataclass turned into a dict.

    Lightning pickles ``hyper_parameters`` into the checkpoint; a dataclass there would make the
    checkpoint unloadable with ``weights_only=True``. The modules coerce dicts back on ``__init__``,
    so ``Module.load_from_checkpoint(path)`` still works.
    """
    module.save_hyperparameters({k: plain(v) for k, v in hparams.items()})


# --------------------------------------------------------------------------------------------
# Models, optimizer
# --------------------------------------------------------------------------------------------


def build_causal_lm(settings: ModelSettings) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` of a causal LM from :class:`ModelSettings`."""
    from equilibrate_pl.models import load_causal_lm

    return load_causal_lm(settings.name_or_path, **settings.loader_kwargs())


def build_scalar_model(settings: ModelSettings) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` of a scalar-head model (reward or critic) from :class:`ModelSettings`."""
    from equilibrate_pl.models import load_scalar_model

    return load_scalar_model(settings.name_or_path, **settings.loader_kwargs())


_NO_DECAY = ("bias", "norm", "embed_tokens.weight", "ln_", "layernorm")


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into decayed (matrices) and non-decayed (biases, norms, 1-d)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or any(key in name.lower() for key in _NO_DECAY):
            no_decay.append(p)
        else:
            decay.append(p)
    if not decay and not no_decay:
        raise ValueError("model has no trainable parameters (frozen base without a LoRA adapter?)")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def configure_adamw(module: LightningModule, params: torch.nn.Module | list[dict[str, Any]], optim: OptimSettings) -> dict[str, Any]:
    """The ``configure_optimizers`` result: AdamW plus a per-step warm-up/decay schedule.

    The schedule length is ``trainer.estimated_stepping_batches`` (``max_steps`` or epochs x
    batches / accumulation), so resuming with a larger ``max_steps`` changes the decay; keep
    ``max_steps`` fixed across a resume for bit-exact continuation.
    """
    from transformers import get_scheduler

    groups = parameter_groups(params, optim.weight_decay) if isinstance(params, torch.nn.Module) else params
    # fused/foreach kernels give the same math; foreach is the fast default on CPU and GPU.
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps)
    total = _total_steps(module)
    warmup = math.ceil(optim.warmup_ratio * total) if optim.warmup_ratio > 0 else optim.warmup_steps
    scheduler = get_scheduler(optim.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


def _total_steps(module: LightningModule) -> int:
    trainer = module._trainer  # None outside a Trainer (a notebook calling configure_optimizers)
    if trainer is None:
        return 1000
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total) or total <= 0:
        raise ValueError("set trainer.max_steps or trainer.max_epochs: the learning-rate schedule needs a length")
    return int(total)


# --------------------------------------------------------------------------------------------
# Non-finite loss guard
# --------------------------------------------------------------------------------------------


class NonFiniteGuard:
    """Skip optimizer steps whose loss is NaN/inf; stop after ``max_consecutive`` in a row.

    One bad batch (an overflow in fp16, an all-padding row) should not kill a long run, but a run
    whose loss stays non-finite is broken and must stop with a clear message. Under several
    processes pass ``sync`` (a max-reduction over ranks) so every rank skips the same step; a
    rank skipping ``backward`` alone would hang DDP.

    The counters are part of the checkpoint (``state_dict`` / ``load_state_dict``).
    """

    def __init__(self, max_consecutive: int = 3) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total_skipped = 0

    def check(self, loss: torch.Tensor, step: int | None = None, sync: Callable[[torch.Tensor], torch.Tensor] | None = None) -> bool:
        """True if ``loss`` is finite (train on it); False to skip this step (logged).

        Raises:
            RuntimeError: the ``max_consecutive``-th non-finite loss in a row.
        """
        bad = (~torch.isfinite(loss.detach())).any().float()
        if sync is not None:
            bad = sync(bad)
        if not bool(bad):
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total_skipped += 1
        where = f" at step {step}" if step is not None else ""
        if self.consecutive >= self.max_consecutive:
            raise RuntimeError(
                f"non-finite loss ({loss.detach().float().flatten()[:4].tolist()}){where} for {self.consecutive} steps in a "
                f"row (limit max_consecutive={self.max_consecutive}); stopping. Usual causes: learning rate too high, "
                "fp16 overflow (use bf16), a batch with no response tokens, or corrupted data"
            )
        log.warning(
            "non-finite loss%s: skipping this optimizer step (%d in a row, %d skipped in total, stop at %d in a row)",
            where, self.consecutive, self.total_skipped, self.max_consecutive,
        )
        return False

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "total_skipped": self.total_skipped}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.consecutive = int(state["consecutive"])
        self.total_skipped = int(state["total_skipped"])


def rank_max(module: LightningModule) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A max-reduction over ranks for :meth:`NonFiniteGuard.check` (``None`` on one process)."""
    trainer = module._trainer
    if trainer is None or trainer.world_size <= 1:
        return None
    return lambda t: trainer.strategy.reduce(t.to(module.device), reduce_op="max")


# --------------------------------------------------------------------------------------------
# Checkpoint files
# --------------------------------------------------------------------------------------------


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temporary file in the target directory, ``fsync``, then ``os.replace``.

    A crash (or a killed job) mid-write leaves the previous checkpoint intact, never a truncated
    ``.ckpt`` that a resume would choke on; the killed save's temporary file is removed by the next
    save of the same checkpoint (``equilibrate_pl.files``). Lightning's own
    ``_atomic_save`` uses an fsspec transaction, which renames but does not ``fsync``, so after a
    power loss the renamed file can be empty. Remote paths (``s3://`` ...) go to Lightning.

    Loading uses ``weights_only=True`` (no arbitrary code from a checkpoint file). Our modules store
    only tensors and plain Python values; a checkpoint holding other objects is refused with an
    explanation, unless ``trusted=True`` (e.g. a checkpoint of your own that pickles a custom class).
    """

    def __init__(self, trusted: bool = False) -> None:
        super().__init__()
        self.trusted = trusted

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        if not _is_local(path):
            return super().save_checkpoint(checkpoint, path)
        atomic_torch_save(checkpoint, Path(path))

    def load_checkpoint(self, path: Any, map_location: Any = lambda storage, loc: storage, weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False or self.trusted:
            return super().load_checkpoint(path, map_location=map_location, weights_only=False)
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            raise RuntimeError(
                f"{path}: the checkpoint holds objects other than tensors and plain values, so it cannot be "
                "loaded safely with torch.load(weights_only=True). If you created this file yourself, load it "
                "with AtomicCheckpointIO(trusted=True).\nDetail: " + str(err).splitlines()[-1]
            ) from err


def _is_local(path: Any) -> bool:
    protocol = get_filesystem(path).protocol
    return "file" in (protocol if isinstance(protocol, (tuple, list)) else (protocol,))


# Settings that run code or choose which code runs: they come from the user's command or config,
# never from a checkpoint (a checkpoint is a file anyone may have written). A model's settings are
# any mapping holding a ``name_or_path``; ``reward_model`` may also be a plain path; LightningCLI
# stores the module's class path under ``_class_path``.
_CODE_FIELDS = ("name_or_path", "trust_remote_code")
_PATH_KEYS = ("reward_model", "implicit_model")
_CLASS_KEYS = ("_class_path", "_instantiator", "class_path")


def split_code_settings(hparams: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(safe, code)``: a module's hyper-parameters without the settings that choose or run code,
    and those settings as ``{"dotted.key": value}`` (e.g. ``"model.trust_remote_code": True``)."""
    safe: dict[str, Any] = {}
    code: dict[str, Any] = {}
    for key, value in hparams.items():
        if key in _CLASS_KEYS or (key in _PATH_KEYS and isinstance(value, str)):
            code[key] = value
        elif isinstance(value, Mapping) and "name_or_path" in value:
            safe[key] = {k: v for k, v in value.items() if k not in _CODE_FIELDS}
            code.update({f"{key}.{k}": value[k] for k in _CODE_FIELDS if k in value})
        else:
            safe[key] = value
    return safe, code


def model_paths(hparams: Mapping[str, Any]) -> dict[str, str]:
    """``{key: path}`` of every model a module with these hyper-parameters loads."""
    paths = {}
    for key, value in hparams.items():
        if key in _PATH_KEYS and isinstance(value, str):
            paths[key] = value
        elif isinstance(value, Mapping) and isinstance(value.get("name_or_path"), str):
            paths[key] = value["name_or_path"]
    return paths


# --------------------------------------------------------------------------------------------
# Callbacks every CLI run gets: the final step is saved, a run that does not learn says so
# --------------------------------------------------------------------------------------------


class FinalCheckpoint(Callback):
    """Make every ``ModelCheckpoint`` with ``save_last`` hold the final state when training ends.

    ``ModelCheckpoint(every_n_train_steps=N, save_last=True)`` writes ``last.ckpt`` at multiples of
    N only: a run of 23 steps with N=5 ends with ``last.ckpt`` at step 20, and an export of it
    silently loses the last 3 steps. At the end of a successful fit this saves the last checkpoint
    again when it is older than the final step (not after an exception: the periodic checkpoint is
    then what a resume should start from). Lightning has no public switch for this, so it uses the
    callback's own ``_save_last_checkpoint`` (the method its own ``on_train_end`` calls).
    """

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from lightning.pytorch.callbacks import ModelCheckpoint

        for callback in trainer.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint) or not callback.save_last:
                continue
            if getattr(callback, "_last_global_step_saved", None) == trainer.global_step and callback.last_model_path:
                continue
            callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))
            log.info("saved the final step %d to %s", trainer.global_step, callback.last_model_path)


class ZeroGradientWatch(Callback):
    """Count optimizer steps whose gradient is exactly zero (or missing) and say so.

    A learning rate far too high can saturate the model in one step: every later gradient is zero,
    the loss stays flat, and the run would otherwise finish "successfully" having learned nothing.
    One fused norm per optimizer step (``torch.nn.utils.get_total_norm``); a warning at the first
    zero step of each optimizer and a count at the end of training.
    """

    def __init__(self) -> None:
        self.zero_steps: dict[int, int] = defaultdict(int)
        self.steps: dict[int, int] = defaultdict(int)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        index = next((i for i, o in enumerate(trainer.optimizers) if o is optimizer or getattr(o, "optimizer", None) is optimizer), 0)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2: the norm of every shard
            norm = norm.full_tensor()
        self.steps[index] += 1
        if float(norm) != 0.0:
            return
        self.zero_steps[index] += 1
        if self.zero_steps[index] == 1:
            log.warning(
                "step %d: the gradient of optimizer %d is zero (%s); the model is not learning from this batch. Usual "
                "causes: a learning rate so high the model saturated, a frozen model, or a loss that does not depend on it",
                trainer.global_step, index, "no parameter has a gradient" if not grads else "every gradient entry is 0",
            )

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for index, zeros in sorted(self.zero_steps.items()):
            log.warning("optimizer %d had a zero gradient in %d of %d steps: this run did not train as configured",
                        index, zeros, self.steps[index])

    def state_dict(self) -> dict[str, Any]:
        return {"zero_steps": dict(self.zero_steps), "steps": dict(self.steps)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.zero_steps = defaultdict(int, state_dict.get("zero_steps", {}))
        self.steps = defaultdict(int, state_dict.get("steps", {}))


# --------------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states as tensors and plain values (weights-only safe)."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": _to_lists(random.getstate()),
        "numpy": {"kind": str(np_kind), "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(_to_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _to_lists(value: Any) -> Any:
    return [_to_lists(v) for v in value] if isinstance(value, (list, tuple)) else value


def _to_tuples(value: Any) -> Any:
    return tuple(_to_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


class RNGStateCallback(Callback):
    """Makes training randomness resume exactly (dropout, sampling in rollouts).

    The training steps draw from their own stream: the global RNG state is saved at the end of each
    training batch and put back at the start of the next one. Whatever runs in between (validation,
    a new epoch's DataLoader drawing its worker seed) then cannot shift what the next step sees, and
    the state saved in a checkpoint is exactly what the next step of an uninterrupted run starts from.
    Each rank keeps its own stream; all are stored (gathered on save, each rank takes its own on load).
    """

    def __init__(self) -> None:
        self._stream: dict[str, Any] | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._stream is None:  # fresh run: the stream starts from the seeded global state
            self._stream = capture_rng_state()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._stream is not None:
            restore_rng_state(self._stream)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._stream = capture_rng_state()

    def state_dict(self) -> dict[str, Any]:
        stream = self._stream if self._stream is not None else capture_rng_state()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, stream)
            return {"per_rank": gathered}
        return {"per_rank": [stream]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict["per_rank"]
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        if rank >= len(states):
            log.warning("checkpoint has RNG states of %d rank(s); rank %d continues from a fresh stream", len(states), rank)
            self._stream = None
            return
        self._stream = states[rank]


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------

_SPECIALS = ("pad_token", "eos_token", "bos_token", "unk_token")


def check_tokenizers_match(a: Any, b: Any, names: Sequence[str] = ("policy", "reward model")) -> None:
    """Raise ``ValueError`` if two tokenizers would give different token ids for the same text.

    Token-level signals (dense rewards, log-prob ratios) are only meaningful when both models read
    the same ids, and a mismatch otherwise shows up hours later as garbage rewards. Compared: the
    vocabulary (token -> id) and the special tokens and their ids.
    """
    na, nb = names
    problems: list[str] = []
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        only_a = sorted(set(va) - set(vb))
        only_b = sorted(set(vb) - set(va))
        moved = sorted(t for t in set(va) & set(vb) if va[t] != vb[t])
        problems.append(
            f"vocabularies differ ({len(va)} vs {len(vb)} tokens; {len(only_a)} only in {na} e.g. {only_a[:3]}, "
            f"{len(only_b)} only in {nb} e.g. {only_b[:3]}, {len(moved)} with different ids e.g. {moved[:3]})"
        )
    for special in _SPECIALS:
        ta, tb = getattr(a, special, None), getattr(b, special, None)
        ia, ib = getattr(a, f"{special}_id", None), getattr(b, f"{special}_id", None)
        if (ta, ia) != (tb, ib):
            problems.append(f"{special}: {na} has {ta!r} (id {ia}), {nb} has {tb!r} (id {ib})")
    if problems:
        raise ValueError(
            f"the {na} and {nb} tokenizers do not match, so token ids (and per-token signals) would not line "
            "up:\n  - " + "\n  - ".join(problems) + f"\nUse a {nb} trained from the same base model / tokenizer as the {na}."
        )


# --------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------


def group_means(values: torch.Tensor, groups: Sequence[str]) -> dict[str, tuple[torch.Tensor, int]]:
    """Per-group ``(mean, count)`` of a (B,) tensor; ``groups`` is each row's FDC group name."""
    rows: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        rows[str(g)].append(i)
    values = values.detach()
    out = {}
    for g, idx in rows.items():
        sel = values[torch.tensor(idx, device=values.device)]
        out[g] = (sel.float().mean(), len(idx))
    return out


def step_is_logged(module: LightningModule) -> bool:
    """Whether what this training step passes to ``self.log`` will be read by anyone.

    ``self.log`` in ``training_step`` defaults to ``on_step=True, on_epoch=False``: the value is kept
    until the next call and only read when Lightning writes the loggers (every
    ``trainer.log_every_n_steps`` optimizer steps), at the end of an epoch or of training (callbacks
    read ``trainer.callback_metrics`` then), or by a progress bar. Each ``self.log`` call costs Python
    work and small tensor copies, so diagnostics logged only when this returns True give identical
    logged values at those steps for less. Between logged steps ``trainer.callback_metrics`` keep the
    previous logged step's value (a callback monitoring a training metric every N steps should use
    a multiple of ``log_every_n_steps``).

    Outside training (validation, test, no trainer) it is always True: epoch aggregates need every batch.
    """
    trainer = module._trainer
    if trainer is None or not trainer.training:
        return True
    if trainer.should_stop or trainer.is_last_batch:
        return True
    if 0 <= trainer.max_steps <= trainer.global_step + 1:
        return True
    # Lightning decides with its own counter (batches that stepped, restored on resume); use its
    # rule when it is there, else the same rule on global_step (equal with one optimizer).
    connector = getattr(trainer, "_logger_connector", None)
    if isinstance(getattr(type(connector), "should_update_logs", None), property):
        return bool(connector.should_update_logs)
    every = trainer.log_every_n_steps
    return every > 0 and (trainer.global_step + 1) % every == 0


def log_per_group(module: LightningModule, prefix: str, values: torch.Tensor, groups: Sequence[str] | None, **kwargs: Any) -> None:
    """Log ``{prefix}/{group}`` means, weighted by each group's rows in the epoch average.

    Cheap (one indexing per group); groups absent from a batch are simply not logged that step.
    Not synced across ranks by default (``sync_dist`` costs a collective per group and metric).
    """
    if not groups:
        return
    for g, (mean, count) in group_means(values, groups).items():
        module.log(f"{prefix}/{g}", mean, batch_size=count, **kwargs)


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


EXPORT_MARKER = "equilibrate_export.json"


class ExportTargetError(ValueError):
    """The export directory holds something we did not write (or is not a directory): nothing is touched."""


def check_export_target(directory: str | os.PathLike[str]) -> Path:
    """The absolute export path, or :class:`ExportTargetError` if writing there could destroy anything.

    An export replaces its target whole, so the target must be missing, an empty directory, or an
    earlier export (it holds :data:`EXPORT_MARKER`). Anything else (your files, the current
    directory, a file) is refused before any work is done.
    """
    out = Path(directory).expanduser().absolute()
    if not out.exists() and not out.is_symlink():
        return out
    if out.is_symlink() or not out.is_dir():
        raise ExportTargetError(f"{directory}: exists and is not a directory; choose a new output directory")
    cwd = Path.cwd().resolve()
    if out.resolve() == cwd or out.resolve() in cwd.parents:
        raise ExportTargetError(f"{directory}: is the current directory (or holds it); choose a new output directory")
    if any(out.iterdir()) and not (out / EXPORT_MARKER).is_file():
        raise ExportTargetError(
            f"{directory}: not empty and not written by equilibrate export (no {EXPORT_MARKER}); an export replaces "
            "its directory whole, so choose a new output directory or empty this one yourself"
        )
    return out


def export_hf(model: torch.nn.Module, tokenizer: Any, directory: str | os.PathLike[str], merge_lora: bool = True,
              info: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` and ``tokenizer`` as a Hugging Face directory (safetensors), atomically.

    With ``merge_lora`` a peft model is merged into a plain model on a COPY (the live model keeps
    training); without it only the adapter is written (``adapter_config.json`` +
    ``adapter_model.safetensors``), which ``load_causal_lm`` merges onto its base when loading.

    The directory is written beside its final place and renamed into it, so a crash never leaves
    half of it. An existing target is only replaced when :func:`check_export_target` allows it
    (missing, empty, or an earlier export, marked by :data:`EXPORT_MARKER`, which holds ``info``).
    """
    import copy
    import shutil

    from peft import PeftModel

    out = check_export_target(directory)
    if isinstance(model, PeftModel) and merge_lora:
        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
            raise ValueError(
                "cannot merge LoRA into a 4/8-bit base without losing precision; export the adapter "
                "(merge_lora=False) and merge it onto the full-precision base"
            )
        model = copy.deepcopy(model).merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = temporary_path(out)
    tmp.mkdir()
    old: Path | None = None
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / EXPORT_MARKER, {"written_by": "equilibrate export", "format": 1, "merge_lora": merge_lora,
                                                **dict(info or {})})
        check_export_target(out)  # again: the directory may have changed while the model was written
        if out.exists() and any(out.iterdir()):
            # Our previous export: moved aside (a temporary name, cleaned like any other), then replaced.
            old = temporary_path(out)
            os.replace(out, old)
        try:
            os.replace(tmp, out)  # onto a missing or empty directory: one rename
        except BaseException:
            if old is not None:  # put the previous export back
                os.replace(old, out)
                old = None
            raise
        fsync_directory(out.parent)
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    return out


class SingleModelHooks:
    """Lightning hooks every one-model stage (SFT, reward model, DPO/ADPO) shares: AdamW over
    ``self.model``, the non-finite guard and the writing class in checkpoints, HF export.

    A mixin listed before ``LightningModule``; the stage sets ``model``, ``tokenizer``, ``optim``
    and ``guard`` in ``__init__``.
    """

    model: torch.nn.Module
    tokenizer: Any
    optim: OptimSettings
    guard: NonFiniteGuard

    def setup(self, stage: str) -> None:
        destroy_process_group_at_exit()

    def configure_optimizers(self) -> dict[str, Any]:
        return configure_adamw(self, self.model, self.optim)  # type: ignore[arg-type]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["nonfinite_guard"] = self.guard.state_dict()
        checkpoint["equilibrate_module"] = module_class_path(self)  # type: ignore[arg-type]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "nonfinite_guard" in checkpoint:
            self.guard.load_state_dict(checkpoint["nonfinite_guard"])

    def export(self, directory: str, merge_lora: bool = True) -> None:
        """The trained model as a Hugging Face directory (safetensors + tokenizer), LoRA merged unless
        asked not to: what ``load_causal_lm`` / ``load_scalar_model`` and the later stages load."""
        export_hf(self.model, self.tokenizer, directory, merge_lora=merge_lora)

"""`equilibrate sft|rm|dpo|ppo` — LightningCLI programs, one per training stage.

    equilibrate dpo fit --config configs/dpo/tiny.yaml
    equilibrate dpo fit --config configs/dpo/tiny.yaml --trainer.max_steps 2
    equilibrate dpo fit --config configs/dpo/tiny.yaml --print_config
    equilibrate dpo fit --config configs/dpo/tiny.yaml --ckpt_path runs/dpo/checkpoints/last.ckpt   # resume

Each stage pairs its LightningModule with ``SafetyDataModule`` (the batch kind set for the stage,
the tokenizer linked to the model's ``name_or_path``). The model is given in subclass mode
(``model.class_path``), so your own subclass of a stage module plugs in from the YAML. Every run
writes checkpoints atomically (:class:`AtomicCheckpointIO`), keeps the RNG streams in them
(:class:`RNGStateCallback`), saves the final step in ``last.ckpt`` (:class:`FinalCheckpoint`) and
warns about steps with a zero gradient (:class:`ZeroGradientWatch`); unknown keys in a config are
rejected by jsonargparse with the key named. On ``--ckpt_path`` settings that run or choose code
stay the config's. A configuration or data error ends in one line on stderr and exit code 2.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI

from equilibrate_pl.data.loaders import DataError

log = logging.getLogger(__name__)

# Set to see the full traceback of a configuration or data error instead of its one-line report.
TRACEBACK_ENV = "EQUILIBRATE_TRACEBACK"


class UserError(Exception):
    """A mistake in the command line, the config or the data: reported in one line, exit code 2."""


def _checkpoint_io_given(plugins: Any) -> bool:
    from lightning.fabric.plugins import CheckpointIO

    items = plugins if isinstance(plugins, (list, tuple)) else [plugins]
    return any(isinstance(p, CheckpointIO) for p in items if p is not None)


def _tokenizer_for(name_or_path: str) -> str:
    """The tokenizer location of a model setting: ``builtin:tiny`` stays (data knows it), other
    ``builtin:`` aliases become their cached directory (``builtin:smollm2`` is converted once)."""
    if name_or_path.startswith("builtin:") and name_or_path != "builtin:tiny":
        from equilibrate_pl.models import resolve_model_path
        from equilibrate_pl.models.smollm2 import SmolLM2NotInstalled

        try:
            return str(resolve_model_path(name_or_path))
        except SmolLM2NotInstalled:
            # Loading the model raises the same error with the install hint; --print_config still works.
            return name_or_path
    return name_or_path

class EquilibrateCLI(LightningCLI):
    """LightningCLI with the project's defaults: data stage + tokenizer link, atomic checkpoints, RNG resume."""

    def __init__(self, *args: Any, data_stage: str, model_link: str | None, **kwargs: Any) -> None:
        self._data_stage = data_stage
        self._model_link = model_link
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.set_defaults({"data.stage": self._data_stage})
        if self._model_link is not None:
            # The data must be tokenized by the model's own tokenizer: one setting, not two to keep in sync.
            # `builtin:*` aliases resolve to local directories here, so the data code (which must not
            # import model code) only ever sees a path or a hub id.
            parser.link_arguments(f"model.init_args.{self._model_link}", "data.tokenizer", compute_fn=_tokenizer_for)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        from equilibrate_pl.modules.common import AtomicCheckpointIO, FinalCheckpoint, RNGStateCallback, ZeroGradientWatch

        plugins = config.get("plugins")
        if not _checkpoint_io_given(plugins):
            given = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
            config["plugins"] = given + [AtomicCheckpointIO()]
        for kind in (RNGStateCallback, FinalCheckpoint, ZeroGradientWatch):
            if not any(isinstance(c, kind) for c in callbacks + list(config.get("callbacks") or [])):
                callbacks = [*callbacks, kind()]
        return super()._instantiate_trainer(config, callbacks)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI's resume: the checkpoint's hyper-parameters over the config, except those that
        choose or run code (model paths, ``trust_remote_code``, the class path), which stay the
        config's: a checkpoint is a file anyone may have written. What was not applied is reported."""
        from equilibrate_pl.modules.common import split_code_settings

        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        import torch

        checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu", mmap=True)
        safe, code = split_code_settings(dict(checkpoint.get("hyper_parameters") or {}))
        model = self.config[subcommand]["model"]
        ignored = []
        for key, value in code.items():
            mine = model.get("class_path") if key == "_class_path" else model.get(f"init_args.{key}")
            if key != "_instantiator" and value != mine:
                ignored.append(f"{key}={value!r} (config: {mine!r})")
        if ignored:
            log.warning("%s: ignored the checkpoint's %s: settings that choose or run code come from your command or "
                        "config only", ckpt_path, ", ".join(ignored))
        if safe:
            update = {subcommand: {"model": {"class_path": model["class_path"], "dict_kwargs": safe}}}
            self.config = self.parser.parse_object(update, self.config)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, OSError) as err:  # the settings' own checks, a model or file that is not there
            if os.environ.get(TRACEBACK_ENV):
                raise
            raise UserError(_one_line(err)) from err

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            self._remove_empty_log_dir()
            raise

    def _remove_empty_log_dir(self) -> None:
        """A run that failed before logging anything leaves no ``version_N`` holding only its config."""
        logger = getattr(self.trainer, "logger", None)
        log_dir = getattr(logger, "log_dir", None)
        if not self.trainer.is_global_zero or not isinstance(log_dir, str) or not os.path.isdir(log_dir):
            return
        if set(os.listdir(log_dir)) <= {"config.yaml", "hparams.yaml"}:
            shutil.rmtree(log_dir, ignore_errors=True)


def _one_line(err: BaseException) -> str:
    """The message that says what is wrong: jsonargparse reports a module's own ValueError as one of
    the "Errors:" of a union ("module class or None"); that one is the user's."""
    text = str(err).strip()
    if "Errors:" in text:
        reasons = [line.strip()[2:] for line in text.split("Errors:", 1)[1].splitlines() if line.strip().startswith("- ")]
        reasons = [r for r in reasons if not r.startswith("Expected a <class 'NoneType'>")]
        if reasons:
            return reasons[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _link_for(module_class: type) -> str | None:
    """Which init argument holds the model settings whose ``name_or_path`` names the tokenizer."""
    params = inspect.signature(module_class.__init__).parameters
    for name in ("model", "actor", "policy"):
        if name in params:
            return f"{name}.name_or_path"
    return None


def run_stage(module_class: type, data_stage: str, argv: list[str] | None, description: str, prog: str = "equilibrate") -> int:
    """Run one stage's LightningCLI on ``argv`` (``fit``/``validate``/... plus options)."""
    from equilibrate_pl.data import SafetyDataModule

    if argv is not None:
        # LightningCLI reads sys.argv when `args` is None (and warns when both are present), and its
        # help/usage text shows sys.argv[0]: present the stage's own command line.
        saved, sys.argv = sys.argv, [prog, *argv]
        try:
            return run_stage(module_class, data_stage, None, description, prog)
        finally:
            sys.argv = saved
    try:
        EquilibrateCLI(
            module_class,
            SafetyDataModule,
            subclass_mode_model=True,
            data_stage=data_stage,
            model_link=_link_for(module_class),
            auto_configure_optimizers=False,  # each module builds AdamW + schedule from its `optim` settings
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"description": description, "default_env": False},
        )
    except (UserError, DataError) as err:
        if isinstance(err, DataError) and os.environ.get(TRACEBACK_ENV):
            raise
        print(f"{prog}: {err} (set {TRACEBACK_ENV}=1 for the traceback)", file=sys.stderr)
        return 2
    return 0


def sft(argv: list[str] | None = None) -> int:
    """`equilibrate sft`: supervised fine-tuning on prompt/response pairs."""
    from equilibrate_pl.modules.sft import SFTModule

    return run_stage(SFTModule, "sft", argv, "Supervised fine-tuning (response tokens only).", "equilibrate sft")


def rm(argv: list[str] | None = None) -> int:
    """`equilibrate rm`: Bradley-Terry reward model."""
    from equilibrate_pl.modules.reward import RewardModule

    return run_stage(RewardModule, "preference", argv, "Reward model (Bradley-Terry, scores every position).", "equilibrate rm")


def dpo(argv: list[str] | None = None) -> int:
    """`equilibrate dpo`: DPO, or ADPO with `model.init_args.ama.enabled: true`."""
    from equilibrate_pl.modules.preference import PreferenceModule

    return run_stage(PreferenceModule, "preference", argv, "DPO / ADPO (DPO with the AMA token mask).", "equilibrate dpo")


def ppo(argv: list[str] | None = None) -> int:
    """`equilibrate ppo`: PPO / APPO / GRPO / RLOO (PolicyModule)."""
    from equilibrate_pl.modules.policy import PolicyModule  # imported lazily: large, and written separately

    return run_stage(PolicyModule, "prompt", argv, "PPO / APPO / GRPO / RLOO on prompt batches.", "equilibrate ppo")

"""`equilibrate sft|rm|cost|dpo|ppo` — LightningCLI programs, one per training stage.

    equilibrate dpo fit --config configs/dpo/tiny.yaml
    equilibrate dpo fit --config configs/dpo/tiny.yaml --trainer.max_steps 2
    equilibrate dpo fit --config configs/dpo/tiny.yaml --print_config
    equilibrate dpo fit --config configs/dpo/tiny.yaml --ckpt_path runs/dpo/checkpoints/last.ckpt   # resume

Each stage pairs its LightningModule with ``SafetyDataModule`` (the batch kind set for the stage,
the tokenizer linked to the model's ``name_or_path``). The model is given in subclass mode
(``model.class_path``, default: the stage's module), so your own subclass of a stage module plugs in
from the YAML. Every run writes checkpoints atomically (:class:`AtomicCheckpointIO`), keeps the
RNG streams in them (:class:`RNGStateCallback`), saves the final step in ``last.ckpt``
(:class:`FinalCheckpoint`) and warns about steps with a zero gradient (:class:`ZeroGradientWatch`);
unknown keys in a config are rejected by jsonargparse with the key named; a model path that does
not exist is a one-line error naming the step that makes it. On ``--ckpt_path`` settings that run
or choose code stay the config's. A configuration or data error ends in one line on stderr and
exit code 2 (``EQUILIBRATE_TRACEBACK=1`` shows the traceback).

:func:`fit_recipe` is the same program called from Python (the quickstart and the benchmarks run
their YAML recipes through it), with command-line style overrides.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

if TYPE_CHECKING:  # Lightning is imported only when a stage really runs (`--help` stays fast)
    from lightning.pytorch import Callback
    from lightning.pytorch.cli import LightningCLI

__all__ = ["STAGES", "RecipeError", "UserError", "fit_recipe", "make_cli", "run_stage", "sft", "rm", "cost", "dpo", "ppo"]

log = logging.getLogger(__name__)

# Set to see the full traceback of a configuration or data error instead of its one-line report.
TRACEBACK_ENV = "EQUILIBRATE_TRACEBACK"


class UserError(Exception):
    """A mistake in the command line, the config or the data: reported in one line, exit code 2."""


@dataclass(frozen=True)
class StageSpec:
    module: str  # "package.module:Class", the default ``model.class_path``
    data_stage: str  # SafetyDataModule's batch kind
    description: str
    data_defaults: tuple[tuple[str, Any], ...] = ()  # other SafetyDataModule defaults of the stage


STAGES: dict[str, StageSpec] = {
    "sft": StageSpec("equilibrate_pl.modules.sft:SFTModule", "sft", "Supervised fine-tuning (response tokens only)."),
    "rm": StageSpec("equilibrate_pl.modules.reward:RewardModule", "preference",
                    "Reward model (Bradley-Terry, scores every position)."),
    "cost": StageSpec("equilibrate_pl.modules.cost:CostModule", "preference",
                      "Cost model (Safe RLHF: pairwise + per-response safety classification; cost > 0 = unsafe).",
                      (("safety_labels", True),)),
    "dpo": StageSpec("equilibrate_pl.modules.preference:PreferenceModule", "preference",
                     "DPO / ADPO (DPO with the AMA token mask)."),
    "ppo": StageSpec("equilibrate_pl.modules.policy:PolicyModule", "prompt", "PPO / APPO / GRPO / RLOO on prompt batches."),
}

_SUBCOMMANDS = (("fit", "train (what you usually run)"), ("validate", "one pass over the validation data"),
                ("test", "one pass over the test data"), ("predict", "one pass of predictions"))


class RecipeError(ValueError):
    """A recipe that cannot run as written (e.g. a model path no earlier step has made). One line."""


def _quick_help(stage: str) -> str:
    """The stage's usage without importing Lightning (which takes seconds): subcommands and pointers."""
    spec = STAGES[stage]
    lines = [f"usage: equilibrate {stage} [-h] {{fit,validate,test,predict}} [--config CONFIG] [options]", "",
             spec.description, "", "subcommands:"]
    lines += [f"  {name:<9} {text}" for name, text in _SUBCOMMANDS]
    lines += ["", "examples:",
              f"  equilibrate {stage} fit --config configs/{stage}/tiny.yaml       # a recipe from configs/",
              f"  equilibrate {stage} fit --config configs/{stage}/tiny.yaml --trainer.max_steps 2",
              f"  equilibrate {stage} fit --help                                   # every option",
              f"  equilibrate {stage} fit --print_config                           # every option, with its default"]
    return "\n".join(lines)


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


def _checkpoint_io_given(plugins: Any) -> bool:
    from lightning.fabric.plugins import CheckpointIO

    items = plugins if isinstance(plugins, (list, tuple)) else [plugins]
    return any(isinstance(p, CheckpointIO) for p in items if p is not None)


# --------------------------------------------------------------------------------------------
# model paths: a missing local path is named with the step that makes it


def _model_paths(init_args: Any, prefix: str = "model.init_args") -> Iterable[tuple[str, str]]:
    """``(config key, path)`` for every model location in a module's init_args."""
    items = init_args.items() if hasattr(init_args, "items") else []
    for key, value in items:
        name = f"{prefix}.{key}"
        if key == "name_or_path" and isinstance(value, str):
            yield name, value
        elif key in ("reward_model", "implicit_model") and isinstance(value, str):
            yield name, value
        elif hasattr(value, "items"):
            yield from _model_paths(value, name)


def _looks_local(path: str) -> bool:
    """A location that can only be a local directory (a hub id is ``name`` or ``owner/name``)."""
    if path.startswith(("builtin:", "hf://")):
        return False
    p = Path(path).expanduser()
    if path.startswith((".", "/", "~")) or len(p.parts) > 2:
        return True
    return len(p.parts) == 2 and Path(p.parts[0]).is_dir()  # e.g. runs/rm while runs/ exists here


def _recipe_dirs() -> list[Path]:
    here = Path.cwd() / "configs"
    repo = Path(__file__).resolve().parents[2] / "configs"
    return [d for d in dict.fromkeys([here, repo]) if d.is_dir()]


def _stage_of(class_path: str) -> str | None:
    module = class_path.rsplit(".", 1)[-1]
    for stage, spec in STAGES.items():
        if spec.module.rsplit(":", 1)[-1] == module:
            return stage
    return None


def how_to_make(path: str) -> str:
    """The command(s) that produce the model directory ``path``, as a short phrase."""
    import yaml

    p = Path(path)
    last = p.parent / "checkpoints" / "last.ckpt"
    if last.is_file():
        return f"export the trained model first: equilibrate export --ckpt {last} --output {path}"
    for root in _recipe_dirs():
        for config in sorted(root.glob("*/*.yaml")):
            try:
                recipe = yaml.safe_load(config.read_text()) or {}
            except yaml.YAMLError:
                continue
            trainer = recipe.get("trainer") or {}
            model = recipe.get("model") or {}
            stage = _stage_of(str(model.get("class_path", "")))
            shown = _shown_path(str(config))
            if stage and trainer.get("default_root_dir") and Path(trainer["default_root_dir"]) == p.parent and p.name == "export":
                ckpt = p.parent / "checkpoints" / "last.ckpt"
                return (f"made by `equilibrate {stage} fit --config {shown}` then "
                        f"`equilibrate export --ckpt {ckpt} --output {path}`")
            if stage and config.parent.name == "quickstart" and config.stem == p.name and p.parent.name == "quickstart":
                return "made by `equilibrate quickstart`"
    return "train and export that model first, or give a hub id / builtin:tiny"


def check_model_paths(init_args: Any) -> None:
    """Raise :class:`RecipeError` for the first local model path that does not exist."""
    for key, path in _model_paths(init_args):
        if _looks_local(path) and not Path(path).expanduser().exists():
            raise RecipeError(f"{key}: model path {path!r} does not exist; {how_to_make(path)}")


# --------------------------------------------------------------------------------------------
# the CLI


def _shown_path(path: str) -> str:
    """``path`` relative to the working directory when it lies under it (what the user typed)."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _cli_class() -> type:
    from lightning.pytorch.cli import LightningCLI

    class EquilibrateCLI(LightningCLI):
        """LightningCLI with the project's defaults: a default module per stage, data stage + tokenizer
        link, checked model paths, atomic checkpoints, RNG resume, and where the checkpoint went."""

        def __init__(self, *args: Any, stage: str, model_link: str | None, extra_callbacks: Sequence[Any] = (),
                     announce: bool = True, **kwargs: Any) -> None:
            self._stage = stage
            self._model_link = model_link
            self._extra_callbacks = list(extra_callbacks)
            self._announce = announce
            super().__init__(*args, **kwargs)

        def add_arguments_to_parser(self, parser: Any) -> None:
            spec = STAGES[self._stage]
            module, cls = spec.module.split(":")
            # `fit --print_config` without a --config shows the stage module's options, not `model: null`.
            parser.set_defaults({"data.stage": spec.data_stage, "model": {"class_path": f"{module}.{cls}"},
                                 **{f"data.{key}": value for key, value in spec.data_defaults}})
            if self._model_link is not None:
                # Declares data.tokenizer as derived (it cannot be given and is not printed); the value
                # itself is set in parse_arguments, see _tokenize_with_the_model.
                parser.link_arguments(f"model.init_args.{self._model_link}", "data.tokenizer", compute_fn=_tokenizer_for)

        def parse_arguments(self, parser: Any, args: Any) -> None:
            super().parse_arguments(parser, args)  # --print_config and --help exit in here
            # Checked before seeding and building anything: a missing model is one line, not a hub OSError.
            subcommand = self.config.get("subcommand")
            config = self.config[subcommand] if subcommand else self.config
            init_args = config.model.get("init_args") if config.model is not None else None
            check_model_paths(init_args.as_dict() if hasattr(init_args, "as_dict") else init_args or {})
            self._tokenize_with_the_model(config, init_args)

        def _tokenize_with_the_model(self, config: Any, init_args: Any) -> None:
            """The data are tokenized by the model's own tokenizer: one setting, not two to keep in sync.

            Set here, not only by the parser's link: jsonargparse never applies a link whose source lies
            inside a subclass's nested dataclass (``model.init_args.model.name_or_path``), so a SmolLM2
            run was silently tokenized with the tiny tokenizer. ``builtin:*`` aliases
            resolve to local directories here, so the data code (which must not import model code)
            only ever sees a path or a hub id.
            """
            if self._model_link is None or init_args is None or config.get("data") is None:
                return
            name = init_args.get(self._model_link)
            if name is not None:  # None: the module's default model settings, whose tokenizer is the default
                config.data.tokenizer = _tokenizer_for(name)

        def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
            from lightning.pytorch.callbacks import ProgressBar

            from equilibrate_pl.modules.common import AtomicCheckpointIO, FinalCheckpoint, RNGStateCallback, ZeroGradientWatch

            plugins = config.get("plugins")
            if not _checkpoint_io_given(plugins):
                given = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
                config["plugins"] = given + [AtomicCheckpointIO()]
            given_callbacks = callbacks + list(config.get("callbacks") or [])
            callbacks = [*callbacks, *self._extra_callbacks]
            for kind in (RNGStateCallback, FinalCheckpoint, ZeroGradientWatch):
                if not any(isinstance(c, kind) for c in given_callbacks):
                    callbacks.append(kind())
            if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given_callbacks):
                from equilibrate_pl.commands.progress import StepProgressBar

                callbacks.append(StepProgressBar())
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

        def after_fit(self) -> None:
            trainer = self.trainer
            if not (self._announce and trainer.is_global_zero):
                return
            ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or getattr(
                trainer.checkpoint_callback, "best_model_path", "")
            if ckpt:
                from equilibrate_pl.modules.common import SingleModelHooks

                ckpt = _shown_path(ckpt)

                export = Path(ckpt).parent.parent / "export"
                # Single-model checkpoints name their module; a PolicyModule checkpoint needs --module.
                cls = type(self.model)
                module = "" if isinstance(self.model, SingleModelHooks) else f" --module {cls.__module__}.{cls.__qualname__}"
                print(f"checkpoint: {ckpt}\n  export it: equilibrate export --ckpt {ckpt} --output {export}{module}", flush=True)
            else:
                print("no checkpoint was written (no ModelCheckpoint callback, or enable_checkpointing: false)", flush=True)

    return EquilibrateCLI


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
    import inspect

    params = inspect.signature(module_class.__init__).parameters
    for name in ("model", "actor", "policy"):
        if name in params:
            return f"{name}.name_or_path"
    return None


def _module_class(stage: str) -> type:
    module, cls = STAGES[stage].module.split(":")
    return getattr(importlib.import_module(module), cls)


def make_cli(stage: str, args: Sequence[str], *, callbacks: Sequence["Callback"] = (), announce: bool = True) -> "LightningCLI":
    """`equilibrate <stage> <args...>` in this process; returns the LightningCLI (``.model``,
    ``.datamodule``, ``.trainer``). ``callbacks`` are added to the Trainer's; ``announce`` prints
    where the checkpoint went (and how to export it) after ``fit``."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose from {list(STAGES)}")
    from equilibrate_pl.cli import quiet_known_noise
    from equilibrate_pl.data import SafetyDataModule

    quiet_known_noise()
    module_class = _module_class(stage)
    # LightningCLI reads sys.argv (and warns when given `args` while sys.argv has options of its own),
    # and its help/usage text shows sys.argv[0]: present the stage's own command line.
    saved, sys.argv = sys.argv, [f"equilibrate {stage}", *args]
    try:
        return _cli_class()(
            module_class,
            SafetyDataModule,
            subclass_mode_model=True,
            stage=stage,
            model_link=_link_for(module_class),
            extra_callbacks=callbacks,
            announce=announce,
            auto_configure_optimizers=False,  # each module builds AdamW + schedule from its `optim` settings
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"description": STAGES[stage].description, "default_env": False},
        )
    finally:
        sys.argv = saved


def fit_recipe(stage: str, config: str | os.PathLike[str], overrides: Sequence[str] = (), *,
               callbacks: Sequence["Callback"] = (), announce: bool = True) -> "LightningCLI":
    """``equilibrate <stage> fit --config <config> <overrides...>`` in this process.

    ``overrides`` are command-line options as a user would type them (``["--trainer.max_steps", "2"]``).
    Returns the LightningCLI after training: ``.model`` is the trained module.
    """
    return make_cli(stage, ["fit", "--config", str(config), *overrides], callbacks=callbacks, announce=announce)


def run_stage(stage: str, argv: list[str] | None) -> int:
    """The console command: ``equilibrate <stage> ...`` (``argv`` without the stage name)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in ([], ["-h"], ["--help"]):
        print(_quick_help(stage))
        return 0 if argv else 2
    from equilibrate_pl.data.loaders import DataError

    try:
        make_cli(stage, argv)
    except RecipeError as err:
        print(f"equilibrate {stage}: {err}", file=sys.stderr)
        return 2
    except (UserError, DataError) as err:
        if isinstance(err, DataError) and os.environ.get(TRACEBACK_ENV):
            raise
        print(f"equilibrate {stage}: {err} (set {TRACEBACK_ENV}=1 for the traceback)", file=sys.stderr)
        return 2
    return 0


def sft(argv: list[str] | None = None) -> int:
    """`equilibrate sft`: supervised fine-tuning on prompt/response pairs."""
    return run_stage("sft", argv)


def rm(argv: list[str] | None = None) -> int:
    """`equilibrate rm`: Bradley-Terry reward model."""
    return run_stage("rm", argv)


def cost(argv: list[str] | None = None) -> int:
    """`equilibrate cost`: Safe RLHF's cost model (needs per-pair safety labels, docs/DATA.md)."""
    return run_stage("cost", argv)


def dpo(argv: list[str] | None = None) -> int:
    """`equilibrate dpo`: DPO, or ADPO with `model.init_args.ama.enabled: true`."""
    return run_stage("dpo", argv)


def ppo(argv: list[str] | None = None) -> int:
    """`equilibrate ppo`: PPO / APPO / GRPO / RLOO (PolicyModule)."""
    return run_stage("ppo", argv)

"""`equilibrate export --ckpt FILE --output DIR [--merge-lora]`: checkpoint -> Hugging Face directory.

The checkpoint names the module class that wrote it (``equilibrate_module``); the module is rebuilt
from the checkpoint's hyper-parameters (loading the base model they name), the trained weights are
loaded with ``torch.load(weights_only=True)``, and the model is saved with safetensors. Without
``--merge-lora`` a LoRA model is written as an adapter directory (``load_causal_lm`` merges it onto
its base when loading); with it, as a plain merged model.

What a checkpoint may not decide: settings that run code. Every model is loaded with
``trust_remote_code=False`` whatever the checkpoint says; ``--trust-remote-code`` turns it on, and
then every model path must be given with ``--model-path KEY=PATH`` (the code that runs is the code
you named, not a path read from a file). ``--output`` is only replaced when it is missing, empty, or
an earlier export (``equilibrate_export.json``); anything else is refused before any work is done.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Mapping

import torch

# A class path read from a file is only imported from these packages unless --module says otherwise.
_TRUSTED_PREFIX = "equilibrate_pl.modules."
# The module's own model, for a --model-path without KEY=.
_MAIN_MODEL_KEYS = ("model", "actor", "policy")


def _module_class(path: str) -> type:
    module_name, _, class_name = path.rpartition(".")
    if not module_name:
        raise ValueError(f"not a class path: {path!r} (expected package.module.Class)")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    from lightning.pytorch import LightningModule

    if not (isinstance(cls, type) and issubclass(cls, LightningModule) and hasattr(cls, "export")):
        raise ValueError(f"{path!r} is not a LightningModule with an export() method")
    return cls


def model_overrides(hparams: Mapping[str, Any], model_paths: Mapping[str, str], trust_remote_code: bool) -> dict[str, Any]:
    """Keyword arguments that replace the checkpoint's code-choosing settings when rebuilding its module.

    Every model is loaded with ``trust_remote_code`` off unless ``trust_remote_code`` is given, and
    then only if every model path comes from ``model_paths`` (the command line). ``model_paths``
    keys are the module's arguments (``model``, ``actor``, ``reward_model``, ``critic``; ``""``
    means the module's own model).
    """
    from equilibrate_pl.modules.common import model_paths as stored_paths

    stored = stored_paths(hparams)
    given = dict(model_paths)
    if "" in given:
        main = next((k for k in _MAIN_MODEL_KEYS if k in stored), None)
        if main is None:
            raise ValueError("--model-path without KEY=: the checkpoint names no 'model' or 'actor'")
        given[main] = given.pop("")
    unknown = sorted(set(given) - set(stored))
    if unknown:
        raise ValueError(f"--model-path {unknown[0]}=...: the checkpoint's module loads no such model; it loads {sorted(stored)}")
    if trust_remote_code:
        missing = [k for k in stored if k not in given]
        if missing:
            raise ValueError(
                "--trust-remote-code runs the code of the models you name, so name every one: add "
                + " ".join(f"--model-path {k}=PATH" for k in missing) + f" (the checkpoint says {[stored[k] for k in missing]})"
            )
    overrides: dict[str, Any] = {}
    for key, path in stored.items():
        value = hparams[key]
        new_path = given.get(key, path)
        if isinstance(value, Mapping):
            overrides[key] = {**value, "name_or_path": new_path, "trust_remote_code": trust_remote_code}
        else:  # a plain path (PreferenceModule.reward_model): loaded with the policy's trust setting
            overrides[key] = new_path
    return overrides


def export_checkpoint(ckpt: str, output: str, merge_lora: bool = False, module: str | None = None,
                      model_paths: Mapping[str, str] | None = None, trust_remote_code: bool = False) -> str:
    """Write the model of checkpoint ``ckpt`` to ``output``; returns the output path."""
    from equilibrate_pl.modules.common import check_export_target

    check_export_target(output)  # before any loading: a refused target costs nothing
    header: dict[str, Any] = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    path = module or header.get("equilibrate_module")
    if path is None:
        raise ValueError(f"{ckpt}: no 'equilibrate_module' entry; pass --module package.module.Class")
    if module is None and not path.startswith(_TRUSTED_PREFIX):
        raise ValueError(
            f"{ckpt} was written by {path!r}, outside {_TRUSTED_PREFIX}*; pass --module {path} to confirm you trust it"
        )
    cls = _module_class(path)
    hparams = dict(header.get("hyper_parameters") or {})
    del header
    overrides = model_overrides(hparams, model_paths or {}, trust_remote_code)
    instance = cls.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True, **overrides)
    instance.export(output, merge_lora=merge_lora)
    return output


def _model_path_args(values: list[str]) -> dict[str, str]:
    paths = {}
    for value in values:
        key, sep, path = value.partition("=")
        if not sep:
            key, path = "", value
        if not path:
            raise ValueError(f"--model-path {value!r}: expected PATH or KEY=PATH")
        paths[key] = path
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="equilibrate export", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint (.ckpt) of an equilibrate stage")
    parser.add_argument("--output", required=True,
                        help="directory to write: must be new, empty, or an earlier export (which is replaced)")
    parser.add_argument("--merge-lora", action="store_true", help="fold LoRA weights into the base model")
    parser.add_argument("--module", default=None, help="module class path, if not the one stored in the checkpoint")
    parser.add_argument("--model-path", action="append", default=[], metavar="[KEY=]PATH",
                        help="load this model instead of the path the checkpoint names (KEY: model, actor, reward_model, "
                        "critic, cost_model, cost_critic; without KEY the module's own model); repeatable")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the model code of the --model-path directories / hub ids (never taken from the checkpoint)")
    args = parser.parse_args(argv)
    from equilibrate_pl.modules.common import ExportTargetError

    try:
        out = export_checkpoint(args.ckpt, args.output, merge_lora=args.merge_lora, module=args.module,
                                model_paths=_model_path_args(args.model_path), trust_remote_code=args.trust_remote_code)
    except (ExportTargetError, FileNotFoundError, ValueError) as err:
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        print(f"equilibrate export: {first}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

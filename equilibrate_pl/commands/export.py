"""`equilibrate export --ckpt FILE --output DIR [--merge-lora]`: checkpoint -> Hugging Face directory.

The checkpoint names the module class that wrote it (``equilibrate_module``); the module is rebuilt
from the checkpoint's hyper-parameters (loading the base model they name), the trained weights are
loaded with ``torch.load(weights_only=True)``, and the model is saved with safetensors. Without
``--merge-lora`` a LoRA model is written as an adapter directory (``load_causal_lm`` merges it onto
its base when loading); with it, as a plain merged model.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

import torch

# A class path read from a file is only imported from these packages unless --module says otherwise.
_TRUSTED_PREFIX = "equilibrate_pl.modules."


def _module_class(path: str) -> type:
    module_name, _, class_name = path.rpartition(".")
    if not module_name:
        raise ValueError(f"not a class path: {path!r} (expected package.module.Class)")
    cls = getattr(importlib.import_module(module_name), class_name, None)
    from lightning.pytorch import LightningModule

    if not (isinstance(cls, type) and issubclass(cls, LightningModule) and hasattr(cls, "export")):
        raise ValueError(f"{path!r} is not a LightningModule with an export() method")
    return cls


def export_checkpoint(ckpt: str, output: str, merge_lora: bool = False, module: str | None = None) -> str:
    """Write the model of checkpoint ``ckpt`` to ``output``; returns the output path."""
    header: dict[str, Any] = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    path = module or header.get("equilibrate_module")
    if path is None:
        raise ValueError(f"{ckpt}: no 'equilibrate_module' entry; pass --module package.module.Class")
    if module is None and not path.startswith(_TRUSTED_PREFIX):
        raise ValueError(
            f"{ckpt} was written by {path!r}, outside {_TRUSTED_PREFIX}*; pass --module {path} to confirm you trust it"
        )
    cls = _module_class(path)
    del header
    instance = cls.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    instance.export(output, merge_lora=merge_lora)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="equilibrate export", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint (.ckpt) of an equilibrate stage")
    parser.add_argument("--output", required=True, help="directory to write (replaced if it exists)")
    parser.add_argument("--merge-lora", action="store_true", help="fold LoRA weights into the base model")
    parser.add_argument("--module", default=None, help="module class path, if not the one stored in the checkpoint")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.ckpt, args.output, merge_lora=args.merge_lora, module=args.module)
    except (FileNotFoundError, ValueError) as err:
        print(f"equilibrate export: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

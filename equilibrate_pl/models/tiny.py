"""The built-in tiny causal LM: a 2-layer Llama built from config, cached on disk.

It is what the quickstart, the notebooks and the test-suite train, so it must be
(1) offline: no hub access, the tokenizer is trained locally by `equilibrate_pl.data.tokenizer`;
(2) deterministic: the same seed gives bit-identical weights on any machine;
(3) a normal Hugging Face directory: every loader path (LoRA, quantisation, scalar head)
    is exercised exactly as it is for a real model.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

# Bump when the architecture or the saving code changes, so stale caches are never reused.
TINY_MODEL_VERSION = 1


def default_cache_dir() -> Path:
    """`$EQUILIBRATE_CACHE`, else `~/.cache/equilibrate` (read at call time: tests set it late)."""
    env = os.environ.get("EQUILIBRATE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "equilibrate"


def tiny_llama_config(vocab_size: int, **overrides: Any) -> LlamaConfig:
    """A ~100k-parameter Llama config (hidden 64, 2 layers, GQA 4/2 heads, tied embeddings).

    Dropout stays at zero: with dropout on, the log-probs of a rollout and of the first PPO
    update differ and the PPO ratio is not 1 at step one (docs/PPO.md).
    """
    settings: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    """Short hash of the tokenizer's vocabulary, specials and template.

    Part of the cache key: if the tokenizer kit changes (new corpus, new specials) the model
    directory is rebuilt instead of silently pairing new token ids with old embeddings.
    """
    h = hashlib.sha256()
    h.update(tokenizer.backend_tokenizer.to_str().encode() if hasattr(tokenizer, "backend_tokenizer") else b"")
    h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(tokenizer.chat_template).encode())
    h.update(repr((tokenizer.pad_token, tokenizer.eos_token, tokenizer.bos_token)).encode())
    return h.hexdigest()[:12]


def build_tiny_model(tokenizer: Any, seed: int = 0, **config_overrides: Any) -> LlamaForCausalLM:
    """A freshly initialised tiny `LlamaForCausalLM` whose special ids match `tokenizer`.

    The global RNG is forked, so building a model does not shift the caller's random stream.
    """
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # With pad == eos, masking pads also masks the real eos (docs/DATA.md: EOS is not padding).
        raise ValueError(
            f"tiny model needs a tokenizer with distinct pad and eos tokens, got pad={tokenizer.pad_token!r} "
            f"eos={tokenizer.eos_token!r}"
        )
    bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    config = tiny_llama_config(
        len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=bos_id,
        **config_overrides,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=bos_id,
    )
    return model.eval()


def tiny_model_dir(cache_dir: str | os.PathLike[str] | None = None, seed: int = 0) -> Path:
    """Path of a saved Hugging Face directory holding the tiny model and its tokenizer.

    Built on first use under `<cache>/tiny-llama-v<version>-seed<seed>-<tokenizer hash>/`, then
    reused. Safe when several processes (DDP ranks, pytest workers) build it at once: each writes a
    private temporary directory and renames it into place; the loser of the race discards its copy.
    """
    from equilibrate_pl.data.tokenizer import tiny_tokenizer  # data never imports models, not vice versa

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    tokenizer = tiny_tokenizer(cache_dir=root, seed=seed)
    final = root / f"tiny-llama-v{TINY_MODEL_VERSION}-seed{seed}-{_tokenizer_fingerprint(tokenizer)}"

    def build(tmp: Path) -> None:
        build_tiny_model(tokenizer, seed=seed).save_pretrained(tmp)  # safetensors: all transformers>=5 writes
        tokenizer.save_pretrained(tmp)

    return build_model_dir(final, build)


def build_model_dir(final: Path, build: Callable[[Path], None]) -> Path:
    """Create the model directory ``final`` once, safely under concurrency.

    ``build(tmp)`` writes into a private temporary directory beside ``final``, which is then renamed
    into place (atomic on POSIX). When several processes (DDP ranks, pytest workers) race, the first
    rename wins and the others discard their copy.
    """
    if (final / "config.json").is_file() and (final / "model.safetensors").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)  # fails if another process got there first
        except OSError:
            if not (final / "model.safetensors").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final

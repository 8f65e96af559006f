"""The built-in tiny Llama: config, determinism, cache reuse and the race-safe cache write."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file

from equilibrate_pl.models import tiny as tiny_mod
from equilibrate_pl.models.tiny import build_tiny_model, tiny_llama_config, tiny_model_dir


def test_tiny_config_shape():
    cfg = tiny_llama_config(500, num_hidden_layers=3)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (500, 64, 128)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.max_position_embeddings) == (4, 2, 512)
    assert cfg.num_hidden_layers == 3  # overrides win
    assert cfg.tie_word_embeddings and cfg.attention_dropout == 0.0


def test_same_seed_same_weights_and_global_rng_untouched(tiny_tok):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny_model(tiny_tok, seed=7).state_dict()
    assert torch.equal(torch.rand(3), expected_next)  # building a model does not consume the caller's RNG
    b = build_tiny_model(tiny_tok, seed=7).state_dict()
    c = build_tiny_model(tiny_tok, seed=8).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], c["model.layers.0.self_attn.q_proj.weight"])


def test_model_dir_special_ids_and_saved_weights(tiny_dir, tiny_tok):
    config = json.loads((tiny_dir / "config.json").read_text())
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    assert tiny_tok.pad_token_id != tiny_tok.eos_token_id
    for cfg in (config, generation):
        assert cfg["pad_token_id"] == tiny_tok.pad_token_id
        assert cfg["eos_token_id"] == tiny_tok.eos_token_id
    assert config["vocab_size"] == len(tiny_tok)
    assert not list(tiny_dir.glob("*.bin"))  # safetensors only
    saved = load_file(tiny_dir / "model.safetensors")
    fresh = build_tiny_model(tiny_tok, seed=0).state_dict()
    for name, tensor in saved.items():
        assert torch.equal(tensor, fresh[name]), name


def test_cache_is_reused(equilibrate_cache, tiny_dir, monkeypatch):
    stamp = os.stat(tiny_dir / "model.safetensors").st_mtime_ns

    def must_not_build(*args, **kwargs):
        raise AssertionError("cached tiny model was rebuilt")

    monkeypatch.setattr(tiny_mod, "build_tiny_model", must_not_build)
    assert tiny_model_dir(equilibrate_cache, seed=0) == tiny_dir
    assert os.stat(tiny_dir / "model.safetensors").st_mtime_ns == stamp


def test_env_var_selects_cache(equilibrate_cache, tiny_dir, monkeypatch):
    monkeypatch.setenv("EQUILIBRATE_CACHE", str(equilibrate_cache))
    assert tiny_model_dir() == tiny_dir


def test_losing_a_build_race_keeps_the_winner(equilibrate_cache, monkeypatch):
    """Another process renames its finished directory into place while we are still building: our
    rename fails, we return the winner's directory and leave no temporary directory behind."""
    real_build = tiny_mod.build_tiny_model
    calls = []

    def build_while_rival_finishes(tokenizer, seed=0, **kw):
        calls.append(seed)
        if len(calls) == 1:
            monkeypatch.setattr(tiny_mod, "build_tiny_model", real_build)
            rival = tiny_model_dir(equilibrate_cache, seed=seed)  # the "other process" wins
            (rival / "winner").write_text("x")
        return real_build(tokenizer, seed=seed, **kw)

    monkeypatch.setattr(tiny_mod, "build_tiny_model", build_while_rival_finishes)
    path = tiny_model_dir(equilibrate_cache, seed=3)
    assert (path / "winner").is_file() and (path / "model.safetensors").is_file()
    assert not [p for p in equilibrate_cache.iterdir() if p.name.startswith(f".{path.name}")]

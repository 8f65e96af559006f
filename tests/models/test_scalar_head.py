"""Scalar-head model: per-position scores in one pass, padding-invariance against a per-row loop,
last-token scores, head initialisation, LoRA / 4-bit variants and the HF save/load round trip."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel

from equilibrate_pl.models import (
    LoraSettings,
    QuantSettings,
    last_token_index,
    last_token_scores,
    load_scalar_model,
    position_scores,
    scalar_head,
)

TEXTS = [
    "How do I kill a Python process that hangs?",
    "Hi",
    "Tell me about the weather in the city last week, please.",
]


@pytest.fixture(scope="module")
def reward(tiny_dir):
    model, tok = load_scalar_model("builtin:tiny")
    with torch.no_grad():  # a non-trivial head and bias, so a wrong position cannot pass by luck
        scalar_head(model).bias.fill_(0.3)
    return model.eval(), tok


def _encode(tok, side: str):
    tok.padding_side = side
    try:
        return tok(TEXTS, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = "right"


def _loop_scores(model, tok) -> list[torch.Tensor]:
    """Reference: each text alone, no padding, no mask, default positions."""
    out = []
    with torch.no_grad():
        for text in TEXTS:
            ids = tok(text, return_tensors="pt")["input_ids"]
            out.append(model(input_ids=ids).logits[0, :, 0])
    return out


@pytest.mark.parametrize("side", ["right", "left"])
def test_position_scores_match_per_row_loop(reward, side):
    model, tok = reward
    enc = _encode(tok, side)
    assert enc["attention_mask"].min() == 0  # the batch really is padded
    with torch.no_grad():
        scores = position_scores(model, enc["input_ids"], enc["attention_mask"])
    assert scores.shape == enc["input_ids"].shape and scores.dtype == torch.float32
    for row, expected in enumerate(_loop_scores(model, tok)):
        real = enc["attention_mask"][row].bool()
        torch.testing.assert_close(scores[row][real], expected, atol=1e-5, rtol=1e-5)
        assert (scores[row][~real] == 0).all()
    last = last_token_scores(scores, enc["attention_mask"])
    torch.testing.assert_close(last, torch.stack([e[-1] for e in _loop_scores(model, tok)]), atol=1e-5, rtol=1e-5)


def test_last_token_scores_by_hand():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 10.0, 11.0, 12.0]])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [1, 3, 0]
    assert last_token_scores(scores, right).tolist() == [2.0, 8.0, 9.0]
    assert last_token_scores(scores, left).tolist() == [4.0, 8.0, 12.0]
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        last_token_scores(scores, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]]))


def test_new_head_init_and_no_dropout(tiny_dir):
    a, _ = load_scalar_model("builtin:tiny")
    b, _ = load_scalar_model("builtin:tiny", head_seed=1)
    c, _ = load_scalar_model("builtin:tiny")
    head = scalar_head(a)
    assert head.out_features == 1 and (head.bias == 0).all()
    assert torch.equal(head.weight, scalar_head(c).weight)  # deterministic
    assert not torch.equal(head.weight, scalar_head(b).weight)
    std = 1 / math.sqrt(head.in_features + 1)
    assert 0.6 * std < head.weight.std() < 1.4 * std
    # backbone equals the causal LM's
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny_dir)
    torch.testing.assert_close(a.model.layers[1].mlp.down_proj.weight, lm.model.layers[1].mlp.down_proj.weight)
    # dropout off: train-mode scores equal eval-mode scores
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    a.train()
    train_scores = position_scores(a, ids, mask)
    a.eval()
    torch.testing.assert_close(train_scores, position_scores(a, ids, mask))


def test_save_load_round_trip(tmp_path, tiny_dir):
    model, tok = load_scalar_model("builtin:tiny")
    with torch.no_grad():
        scalar_head(model).weight.mul_(3.0)
        model.model.norm.weight.add_(0.5)
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForTokenClassification"] and len(config["id2label"]) == 1
    enc = _encode(tok, "right")
    with torch.no_grad():
        expected = position_scores(model, enc["input_ids"], enc["attention_mask"])
        loaded, _ = load_scalar_model(tmp_path / "rm")  # auto: the trained head is kept
        torch.testing.assert_close(position_scores(loaded, enc["input_ids"], enc["attention_mask"]), expected)
        strict, _ = load_scalar_model(tmp_path / "rm", init_from_causal_lm=False)
        torch.testing.assert_close(scalar_head(strict).weight, scalar_head(model).weight)
        fresh, _ = load_scalar_model(tmp_path / "rm", init_from_causal_lm=True)  # asked for a new head
        assert not torch.equal(scalar_head(fresh).weight, scalar_head(model).weight)
    with pytest.raises(ValueError, match="no trained scalar head"):
        load_scalar_model(tiny_dir, init_from_causal_lm=False)


def test_lora_scalar_model_trains_head_and_round_trips(tmp_path):
    critic, tok = load_scalar_model("builtin:tiny", lora=LoraSettings(r=4))
    assert isinstance(critic, PeftModel)
    trainable = [n for n, p in critic.named_parameters() if p.requires_grad]
    head_params = [n for n in trainable if ".score." in n]
    assert len(head_params) == 2 and all("modules_to_save" in n for n in head_params)  # weight + bias, full
    assert all("lora_" in n for n in trainable if n not in head_params)
    enc = _encode(tok, "right")
    scores = position_scores(critic, enc["input_ids"], enc["attention_mask"])
    last_token_scores(scores, enc["attention_mask"]).sum().backward()
    assert scalar_head(critic).weight.grad.abs().sum() > 0
    with torch.no_grad():
        for name, p in critic.named_parameters():
            if p.requires_grad:
                p.add_(0.05)
        expected = position_scores(critic, enc["input_ids"], enc["attention_mask"])
    critic.save_pretrained(tmp_path / "critic-adapter")
    merged, _ = load_scalar_model(tmp_path / "critic-adapter")  # adapter + trained head merged into a plain model
    assert not isinstance(merged, PeftModel)
    with torch.no_grad():
        torch.testing.assert_close(
            position_scores(merged, enc["input_ids"], enc["attention_mask"]), expected, atol=1e-5, rtol=1e-5
        )


def test_four_bit_reward_keeps_full_precision_head(reward, tmp_path):
    import bitsandbytes as bnb

    model, tok = reward
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    quant, _ = load_scalar_model(tmp_path / "rm", quant=QuantSettings(bits=4))
    assert isinstance(quant.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    head = scalar_head(quant)
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32
    torch.testing.assert_close(head.weight, scalar_head(model).weight)
    enc = _encode(tok, "left")
    with torch.no_grad():
        full = position_scores(model, enc["input_ids"], enc["attention_mask"])
        q = position_scores(quant, enc["input_ids"], enc["attention_mask"])
    assert torch.isfinite(q).all()
    # nf4 error on the backbone only: small next to the spread of the full-precision scores
    assert (q - full).abs().max() < 0.3 * full[enc["attention_mask"].bool()].std()  # measured: 0.16


def test_qlora_critic_gradients_reach_lora_and_head():
    critic, tok = load_scalar_model("builtin:tiny", lora=LoraSettings(r=4), quant=QuantSettings(bits=4))
    enc = _encode(tok, "left")
    scores = position_scores(critic, enc["input_ids"], enc["attention_mask"])
    (scores.sum() / enc["attention_mask"].sum()).backward()
    grads = {n: p.grad for n, p in critic.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all("lora_" in n or ".score.modules_to_save." in n for n in grads)
    assert scalar_head(critic).weight.grad.abs().sum() > 0

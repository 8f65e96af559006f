"""load_causal_lm: dtype, LoRA, 8/4-bit through bitsandbytes on CPU, activation checkpointing,
merging, adapter directories, and the LoRA reference model (docs/MODELS.md: the LoRA reference)."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel
from peft.utils.other import ModulesToSaveWrapper

from equilibrate_pl.models import (
    build_tiny_model,
    LoraSettings,
    QuantSettings,
    ReferenceModelError,
    adapter_disabled,
    check_adapter_reference,
    count_parameters,
    freeze,
    load_causal_lm,
    load_scalar_model,
    merge_lora,
    position_scores,
    resolve_model_path,
)


@pytest.fixture(scope="module")
def batch(tiny_tok):
    enc = tiny_tok(
        ["How do I kill a Python process?", "Tell me about the weather today, please."],
        return_tensors="pt", padding=True,
    )
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return enc["input_ids"], enc["attention_mask"], labels


def _perturb_adapter(model: torch.nn.Module, seed: int = 0) -> None:
    """LoRA B starts at zero (adapter = identity); give every trainable tensor random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_resolve_model_path(tiny_dir):
    assert resolve_model_path("builtin:tiny") == str(tiny_dir)
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(ValueError, match="unknown built-in"):
        resolve_model_path("builtin:huge")


def test_settings_validation():
    with pytest.raises(ValueError, match="bits"):
        QuantSettings(bits=3)
    with pytest.raises(ValueError, match="dtype"):
        QuantSettings(compute_dtype="float64x")
    with pytest.raises(ValueError, match="r must"):
        LoraSettings(r=0)


def test_plain_load_dtype_and_special_tokens(tiny_tok):
    model, tok = load_causal_lm("builtin:tiny", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert tok.padding_side == "right" and tok.pad_token_id == tiny_tok.pad_token_id
    assert model.config.pad_token_id == tok.pad_token_id != model.config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    trainable, total = count_parameters(model)
    assert trainable == total > 0


def test_lora_only_adapter_trainable_and_count(tiny_dir):
    r = 4
    model, _ = load_causal_lm("builtin:tiny", lora=LoraSettings(r=r, alpha=8))
    assert isinstance(model, PeftModel)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    # Hand count: "all-linear" adapts q,k,v,o,gate,up,down in every layer, r * (in + out) each.
    cfg = model.config
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    per_layer = r * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h))
    assert sum(trainable.values()) == cfg.num_hidden_layers * per_layer == count_parameters(model)[0]


def test_lora_identity_at_init_and_disable_adapter_gives_base(batch):
    ids, mask, _ = batch
    base, _ = load_causal_lm("builtin:tiny")
    lora, _ = load_causal_lm("builtin:tiny", lora=LoraSettings(r=4))
    base_logits = base(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(lora(input_ids=ids, attention_mask=mask).logits, base_logits)
    _perturb_adapter(lora)
    adapted = lora(input_ids=ids, attention_mask=mask).logits
    assert (adapted - base_logits).abs().max() > 1e-3
    with adapter_disabled(lora) as ref:
        ref_logits = ref(input_ids=ids, attention_mask=mask).logits
    assert not ref_logits.requires_grad
    torch.testing.assert_close(ref_logits, base_logits)
    torch.testing.assert_close(lora(input_ids=ids, attention_mask=mask).logits, adapted)  # re-enabled


def test_merge_lora_and_adapter_directory_are_merged(batch, tmp_path):
    ids, mask, _ = batch
    lora, _ = load_causal_lm("builtin:tiny", lora=LoraSettings(r=4))
    _perturb_adapter(lora, seed=1)
    lora.save_pretrained(tmp_path / "sft-adapter")  # adapter weights only, no base
    with torch.no_grad():
        expected = lora(input_ids=ids, attention_mask=mask).logits
        merged = merge_lora(lora)
        assert not isinstance(merged, PeftModel)
        torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=1e-5)

    # Loading the adapter directory merges it, so a NEW adapter on top disables back to the SFT model.
    sft, _ = load_causal_lm(tmp_path / "sft-adapter")
    assert not isinstance(sft, PeftModel)
    assert count_parameters(sft)[0] == count_parameters(sft)[1]  # a merged SFT model trains in full
    with torch.no_grad():
        torch.testing.assert_close(sft(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=1e-5)
    policy, _ = load_causal_lm(tmp_path / "sft-adapter", lora=LoraSettings(r=4))
    _perturb_adapter(policy, seed=2)
    with adapter_disabled(policy):
        torch.testing.assert_close(policy(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=1e-5)


def _loss_and_grads(model, batch):
    ids, mask, labels = batch
    model.train()
    model.zero_grad()
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora", [None, LoraSettings(r=4)], ids=["full", "lora"])
def test_activation_checkpointing_same_gradients(batch, lora):
    plain, _ = load_causal_lm("builtin:tiny", lora=lora)
    ckpt, _ = load_causal_lm("builtin:tiny", lora=lora, gradient_checkpointing=True)
    if lora is not None:
        _perturb_adapter(plain)  # LoRA B = 0 would leave lora_A without gradient
        ckpt.load_state_dict(plain.state_dict())  # LoRA A is drawn at random: copy, do not re-draw
    inner = ckpt.get_base_model() if lora else ckpt
    assert inner.is_activation_checkpointing and not inner.config.use_cache
    loss_a, grads_a = _loss_and_grads(plain, batch)
    loss_b, grads_b = _loss_and_grads(ckpt, batch)
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_forward_close_to_full_precision(batch, tiny_tok, bits):
    import bitsandbytes as bnb

    ids, mask, _ = batch
    full, _ = load_causal_lm("builtin:tiny")
    quant, _ = load_causal_lm("builtin:tiny", quant=QuantSettings(bits=bits))
    other = build_tiny_model(tiny_tok, seed=1)  # scale of "a different model" for the same inputs
    layer_cls = bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit
    assert isinstance(quant.model.layers[0].self_attn.q_proj, layer_cls)
    real = mask.bool()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 8-bit: "inputs will be cast from float32 to float16"
        ref, out, far = (
            m(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)[real] for m in (full, quant, other)
        )
    assert torch.isfinite(out).all()
    # Measured: 8-bit ~0.01 and nf4 ~0.1 of the distance to another random init.
    ratio = (out - ref).abs().mean() / (far - ref).abs().mean()
    assert ratio < (0.05 if bits == 8 else 0.25), ratio


def test_qlora_backward_reaches_only_lora(batch):
    model, _ = load_causal_lm("builtin:tiny", lora=LoraSettings(r=4), quant=QuantSettings(bits=4))
    _, grads = _loss_and_grads(model, batch)
    assert grads and all("lora_" in n for n in grads)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert sum(g.abs().sum() for n, g in grads.items() if "lora_B" in n) > 0  # B is zero-initialised: gets grad first
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_freeze():
    model, _ = load_causal_lm("builtin:tiny")
    model.train()
    assert freeze(model) is model
    assert not model.training and not any(p.requires_grad for p in model.parameters())


# ---- the reference obtained by disabling the adapter (docs/MODELS.md: the LoRA reference) ----

def test_reference_check_refuses_models_without_single_adapter(tiny_dir):
    plain, _ = load_causal_lm("builtin:tiny")
    with pytest.raises(ReferenceModelError, match="no LoRA adapter"):
        check_adapter_reference(plain)
    from peft import LoraConfig

    two, _ = load_causal_lm("builtin:tiny", lora=LoraSettings(r=2))
    two.add_adapter("rl", LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ReferenceModelError, match="2 adapters"):
        check_adapter_reference(two)


def _scalar_pair(batch):
    ids, mask, _ = batch
    base, _ = load_scalar_model("builtin:tiny")
    critic, _ = load_scalar_model("builtin:tiny", lora=LoraSettings(r=4))  # head in modules_to_save
    assert any(isinstance(m, ModulesToSaveWrapper) for m in critic.modules())
    _perturb_adapter(critic)  # trains LoRA AND the copy of the head
    with torch.no_grad():
        base_scores = position_scores(base, ids, mask)
    return critic, base_scores


def test_modules_to_save_restored_by_this_peft(batch):
    """peft fixed huggingface/peft#493: with the installed version the trained head copy is bypassed."""
    ids, mask, _ = batch
    critic, base_scores = _scalar_pair(batch)
    with torch.no_grad():
        assert (position_scores(critic, ids, mask) - base_scores).abs().max() > 1e-3
    with adapter_disabled(critic):
        torch.testing.assert_close(position_scores(critic, ids, mask), base_scores)


def test_modules_to_save_not_restored_is_detected(batch, monkeypatch):
    """Emulate peft <= 0.4, where disable_adapter left modules_to_save copies active: the reference
    really is wrong then, and check_adapter_reference / adapter_disabled refuse to run it."""
    ids, mask, _ = batch
    critic, base_scores = _scalar_pair(batch)
    real = ModulesToSaveWrapper.enable_adapters

    def old_peft_enable_adapters(self, enabled: bool):
        if enabled:
            real(self, enabled)

    monkeypatch.setattr(ModulesToSaveWrapper, "enable_adapters", old_peft_enable_adapters)
    with critic.disable_adapter(), torch.no_grad():
        wrong = position_scores(critic, ids, mask)
    assert (wrong - base_scores).abs().max() > 1e-3  # the silent bug this check exists for
    with pytest.raises(ReferenceModelError, match="score"):
        check_adapter_reference(critic)
    with pytest.raises(ReferenceModelError):
        with adapter_disabled(critic):
            pass


def _checkpoint_without_pad(directory):
    """A tiny Llama whose tokenizer has eos but no pad (like many base models on the hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from equilibrate_pl.models import tiny_llama_config

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": 3 + i for i in range(40)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    assert tok.pad_token is None
    torch.manual_seed(0)
    original = LlamaForCausalLM(tiny_llama_config(len(tok), eos_token_id=2, bos_token_id=1))
    original.save_pretrained(directory)
    tok.save_pretrained(directory)
    return original, len(vocab)


def test_added_pad_token_grows_embeddings(tmp_path):
    """load_tokenizer adds <|pad|>: the embeddings grow by one mean-initialised row, the config
    learns the pad id, and the logits of existing tokens do not move."""
    original, n_vocab = _checkpoint_without_pad(tmp_path / "nopad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, tok = load_causal_lm(tmp_path / "nopad")
    assert len(tok) == n_vocab + 1 and tok.pad_token_id == n_vocab
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == n_vocab + 1
    assert model.config.pad_token_id == model.generation_config.pad_token_id == n_vocab != model.config.eos_token_id
    torch.testing.assert_close(emb[-1], original.get_input_embeddings().weight.mean(0), atol=1e-2, rtol=0)
    ids = torch.tensor([[1, 5, 9, 12, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits[..., :n_vocab], original(ids).logits)


def test_adapter_trained_with_added_pad_reloads(tmp_path):
    """The SFT adapter of a model that got a pad token carries resized embeddings; loading it must
    resize the base before attaching the adapter (else: size mismatch)."""
    _checkpoint_without_pad(tmp_path / "nopad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sft, tok = load_causal_lm(tmp_path / "nopad", lora=LoraSettings(r=4))
        _perturb_adapter(sft)
        sft.save_pretrained(tmp_path / "adapter")
        tok.save_pretrained(tmp_path / "adapter")
        ids = torch.tensor([[1, 5, 9, len(tok) - 1, 2]])  # includes the new pad id
        with torch.no_grad():
            expected = sft(ids).logits
        merged, _ = load_causal_lm(tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=1e-5)

"""The rollout engine against transformers' ``generate`` and against exact probabilities.

Greedy decoding: the KV-cache engine returns ``generate``'s tokens, row lengths and end flags
exactly (GQA and plain attention, sdpa and eager, a second architecture, LoRA, left padding, several
eos ids, stop strings, shared prompts, finished rows leaving the batch). Sampling: the draws follow
the model's distribution (chi-square against probabilities from a full forward; mean log-prob of
the drawn token equals minus the entropy it was drawn from) and ``generate``'s (two-sample test),
with seeds fixed so every run of the suite sees the same draws.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from equilibrate_pl.algorithms.sampling import filter_logits, inverse_cdf_sample
from equilibrate_pl.models.forward import rollout_token_logprobs
from equilibrate_pl.models.rollout_engine import (
    HFGenerateEngine,
    KVCacheEngine,
    SamplingParams,
    generate_tokens,
    prepacked_linears,
    resolve_engine,
)

PAD, EOS = 0, 1


def chi2_sf(stat: float, dof: int) -> float:
    """P(X >= stat) for X ~ chi-square(dof): the regularised upper incomplete gamma function."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


def goodness_of_fit(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square p-value of ``counts`` against ``probs``; cells with expectation < 5 pooled."""
    expected = probs.double() * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum().reshape(1)])
    exp = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = exp > 0
    assert not bool((obs[~keep] > 0).any()), "a draw of probability zero"
    obs, exp = obs[keep], exp[keep]
    assert obs.numel() >= 3, "too few cells for a test"
    return chi2_sf(float(((obs - exp) ** 2 / exp).sum()), int(keep.sum()) - 1)


def homogeneity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Chi-square p-value that two count vectors come from one distribution (sparse cells pooled)."""
    total = a + b
    pooled = total < 10
    a = torch.cat([a[~pooled], a[pooled].sum().reshape(1)]).double()
    b = torch.cat([b[~pooled], b[pooled].sum().reshape(1)]).double()
    keep = (a + b) > 0
    a, b = a[keep], b[keep]
    assert a.numel() >= 3, "too few cells for a test"
    table = torch.stack([a, b])
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    return chi2_sf(float(((table - expected) ** 2 / expected).sum()), int(keep.sum()) - 1)


# --------------------------------------------------------------------------------------------
# The sampling math
# --------------------------------------------------------------------------------------------


def test_inverse_cdf_draws_follow_the_probabilities_and_never_a_zero() -> None:
    """700 entries (blocks of 256 with a ragged last one), a zero block, zeros at both ends."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(700, generator=gen) * 2
    logits[:3] = -math.inf
    logits[256:512] = -math.inf  # a whole block without mass
    logits[-5:] = -math.inf
    probs = torch.softmax(logits, -1)
    draws = torch.cat([inverse_cdf_sample(probs.expand(4000, -1), generator=gen) for _ in range(10)])
    counts = torch.bincount(draws, minlength=700)
    assert counts[probs == 0].sum() == 0
    assert goodness_of_fit(counts, probs) > 1e-3
    # a single token with all the mass, at the very end of the vocabulary
    one_hot = torch.zeros(3, 513)
    one_hot[:, 512] = 1.0
    assert inverse_cdf_sample(one_hot).tolist() == [512, 512, 512]


def test_filter_logits_keeps_what_the_filters_should() -> None:
    """Temperature, top-k and top-p against a hand computation on sorted probabilities."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 40, generator=gen) * 3
    scores = filter_logits(logits, temperature=0.7, top_k=10, top_p=0.8)
    for row in range(3):
        z = logits[row] / 0.7
        order = z.argsort(descending=True)[:10]  # top-k
        p = torch.softmax(z[order], -1)
        # top-p keeps the smallest prefix of the sorted tokens whose mass reaches 0.8
        n = int((p.cumsum(0) < 0.8).sum()) + 1
        kept = set(order[:n].tolist())
        assert set(torch.isfinite(scores[row]).nonzero().squeeze(1).tolist()) == kept
        assert torch.allclose(scores[row][list(kept)], z[list(kept)])


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


# Weights drawn 10x wider than transformers' default: attention is then sharp enough that a
# position or mask off by one changes the greedy tokens (at 0.02 it is near uniform and would not).
INIT = 0.2


def _llama(attn: str = "sdpa", vocab: int = 64, seed: int = 0, kv_heads: int = 2, init: float = INIT) -> nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, pad_token_id=PAD, eos_token_id=EOS, attn_implementation=attn,
                      initializer_range=init)
    return LlamaForCausalLM(cfg).eval()


def _qwen2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, pad_token_id=PAD, eos_token_id=EOS, attn_implementation="sdpa",
                      initializer_range=INIT)
    return Qwen2ForCausalLM(cfg).eval()


def _prompts(rows: int = 6, width: int = 9, vocab: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of different lengths (row r has r % 4 pads)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (rows, width), generator=gen)
    mask = torch.ones_like(ids)
    for r in range(rows):
        mask[r, : r % 4] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def _hf(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, params: SamplingParams, tokenizer: Any = None) -> Any:
    return HFGenerateEngine().generate(model, ids, mask, params, tokenizer=tokenizer)


def _ending_ids(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[int, ...]:
    """Two tokens greedy decoding emits at different steps in different rows: as eos ids they end
    rows at different times (some rows may never meet them)."""
    free = _hf(model, ids, mask, SamplingParams(max_new_tokens=10, eos_token_ids=(EOS,), pad_token_id=PAD, do_sample=False))
    responses = free.responses
    return int(responses[0, 4]), int(responses[2, 2])


def _assert_same(a: Any, b: Any) -> None:
    assert torch.equal(a.sequences, b.sequences), (a.sequences, b.sequences)
    assert torch.equal(a.lengths, b.lengths) and torch.equal(a.finished, b.finished)


@pytest.mark.parametrize("model_fn", [
    lambda: _llama("sdpa"), lambda: _llama("eager"), lambda: _llama("sdpa", kv_heads=4), _qwen2,
], ids=["llama-gqa-sdpa", "llama-gqa-eager", "llama-mha", "qwen2-bias"])
@pytest.mark.parametrize("engine", [KVCacheEngine(), KVCacheEngine(prepack=False), KVCacheEngine(compact_fraction=1.0)],
                         ids=["default", "no-prepack", "no-compaction"])
def test_greedy_tokens_equal_generate(model_fn: Any, engine: KVCacheEngine) -> None:
    model = model_fn()
    ids, mask = _prompts()
    params = SamplingParams(max_new_tokens=10, eos_token_ids=_ending_ids(model, ids, mask), pad_token_id=PAD, do_sample=False)
    ours = engine.generate(model, ids, mask, params)
    theirs = _hf(model, ids, mask, params)
    assert bool(ours.finished.any()) and not bool(ours.finished.all())  # rows end at different times
    _assert_same(ours, theirs)
    assert "forward" not in vars(model.lm_head)  # the prepacked weights are gone after the call


def test_greedy_with_lora_equals_generate() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.eval()
    ids, mask = _prompts()
    params = SamplingParams(max_new_tokens=10, eos_token_ids=_ending_ids(model, ids, mask), pad_token_id=PAD, do_sample=False)
    ours = generate_tokens(model, ids, mask, params, engine="kv")
    _assert_same(ours, _hf(model, ids, mask, params))
    with model.disable_adapter():  # the adapter matters: without it the tokens differ
        assert not torch.equal(generate_tokens(model, ids, mask, params, engine="kv").sequences, ours.sequences)


def test_shared_prompts_run_once_and_change_nothing() -> None:
    model = _llama()
    ids, mask = _prompts(rows=3)
    ids, mask = ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0)
    params = SamplingParams(max_new_tokens=8, eos_token_ids=_ending_ids(model, ids, mask), pad_token_id=PAD, do_sample=False)
    calls = []
    hook = model.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True)
    try:
        grouped = generate_tokens(model, ids, mask, params, engine="kv", group=4)
    finally:
        hook.remove()
    assert calls[0] == (3, ids.shape[1])  # the prefill ran each prompt once
    _assert_same(grouped, _hf(model, ids, mask, params))
    # a wrong hint is ignored, not trusted
    _assert_same(generate_tokens(model, *_prompts(rows=4), params, engine="kv", group=2), _hf(model, *_prompts(rows=4), params))


def test_stop_strings_end_rows_like_generate(equilibrate_cache: Any) -> None:
    from equilibrate_pl.data.tokenizer import tiny_tokenizer

    tok = tiny_tokenizer()
    model = _llama(vocab=len(tok))
    model.config.pad_token_id, model.config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    ids, mask = _prompts(vocab=len(tok))
    free = _hf(model, ids, mask, SamplingParams(max_new_tokens=8, eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id,
                                               do_sample=False))
    stop = tok.decode(free.responses[1, 2:4])  # the text of row 1's third and fourth tokens
    assert stop.strip()
    params = SamplingParams(max_new_tokens=8, eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id, do_sample=False,
                            stop_strings=(stop,))
    ours = generate_tokens(model, ids, mask, params, engine="kv", tokenizer=tok)
    _assert_same(ours, _hf(model, ids, mask, params, tokenizer=tok))
    assert bool(ours.finished[1]) and int(ours.lengths[1]) <= 4
    with pytest.raises(ValueError, match="tokenizer"):
        generate_tokens(model, ids, mask, params, engine="kv")


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def _peaky(vocab: int = 24, seed: int = 3) -> nn.Module:
    """A tiny model whose next-token distributions are far from uniform (scaled LM head)."""
    model = _llama(vocab=vocab, seed=seed, init=0.02)
    with torch.no_grad():
        model.lm_head.weight.mul_(12.0)
    return model


@pytest.mark.parametrize("filters", [{}, {"temperature": 0.7, "top_k": 6, "top_p": 0.9}], ids=["plain", "filtered"])
def test_sampled_first_tokens_follow_the_model(filters: dict[str, Any]) -> None:
    model = _peaky()
    ids, mask = _prompts(rows=2, width=5, vocab=24, seed=1)
    rows = 3000
    ids, mask = ids.repeat(rows, 1), mask.repeat(rows, 1)
    params = SamplingParams(max_new_tokens=1, eos_token_ids=(EOS,), pad_token_id=PAD, **filters)
    torch.manual_seed(0)
    first = generate_tokens(model, ids, mask, params, engine="kv").responses[:, 0]
    with torch.no_grad():  # the reference: a full forward of each prompt, unpadded
        for r in range(2):
            logits = model(input_ids=ids[r][mask[r].bool()][None]).logits[0, -1]
            probs = torch.softmax(filter_logits(logits[None], params.temperature, params.top_k, params.top_p), -1)[0]
            assert goodness_of_fit(torch.bincount(first[r::2], minlength=24), probs) > 1e-3


def test_sampled_tokens_have_the_log_prob_their_entropy_predicts_and_match_generate() -> None:
    """Every drawn token's log-prob (teacher-forced) averages to minus the entropy of the
    distribution it was drawn from, at every step: a draw from any other distribution has a lower
    mean. And the tokens of later steps (after the cache has been written to) are distributed as
    ``generate``'s."""
    model = _peaky()
    ids, mask = _prompts(rows=4, width=5, vocab=24, seed=2)
    ids, mask = ids.repeat(800, 1), mask.repeat(800, 1)
    params = SamplingParams(max_new_tokens=4, eos_token_ids=(EOS,), pad_token_id=PAD)
    torch.manual_seed(0)
    ours = generate_tokens(model, ids, mask, params, engine="kv")
    torch.manual_seed(1)
    theirs = _hf(model, ids, mask, params)
    seq = torch.cat([ids, ours.responses.masked_fill(~ours.response_mask, PAD)], 1)
    att = torch.cat([mask, ours.response_mask.long()], 1)
    with torch.no_grad():
        out = rollout_token_logprobs(model, seq, att, ids.shape[1], with_entropy=True)
    gap, m = out["logprobs"] + out["entropy"], ours.response_mask
    for t in range(params.max_new_tokens):
        col = gap[:, t][m[:, t]]
        assert col.numel() > 1000
        assert abs(float(col.mean())) < 4 * float(col.std()) / math.sqrt(col.numel()), t
    for t in range(1, params.max_new_tokens):
        a = torch.bincount(ours.responses[:, t][m[:, t]], minlength=24)
        b = torch.bincount(theirs.responses[:, t][theirs.response_mask[:, t]], minlength=24)
        assert homogeneity(a, b) > 1e-3, t


# --------------------------------------------------------------------------------------------
# Choice of engine, prepacked weights
# --------------------------------------------------------------------------------------------


def test_auto_falls_back_to_generate_where_the_cache_engine_cannot_run() -> None:
    assert isinstance(resolve_engine("auto", _llama(), 20), KVCacheEngine)
    torch.manual_seed(0)
    windowed = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                                                attn_implementation="sdpa"))
    assert isinstance(resolve_engine("auto", windowed, 20), HFGenerateEngine)
    assert isinstance(resolve_engine("auto", windowed, 8), KVCacheEngine)  # the window covers every row
    with pytest.raises(ValueError, match="cannot run"):
        resolve_engine("kv", windowed, 20)
    with pytest.raises(ValueError, match="unknown rollout engine"):
        resolve_engine("vllm", windowed, 20)
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="LEFT padded"):
        generate_tokens(_llama(), ids.flip(1), mask.flip(1), SamplingParams(max_new_tokens=2, eos_token_ids=(EOS,), pad_token_id=PAD))


def test_prepacked_linears_compute_the_same_logits_and_restore_the_model() -> None:
    model = _llama()
    ids, mask = _prompts()
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with prepacked_linears(model, rows=6):
            assert "forward" in vars(model.lm_head)
            with prepacked_linears(model, rows=6):  # nested: the outer block's copies are reused
                packed = model(input_ids=ids, attention_mask=mask).logits
            assert "forward" in vars(model.lm_head)
        assert "forward" not in vars(model.lm_head)
    assert torch.allclose(packed, plain, atol=1e-5)

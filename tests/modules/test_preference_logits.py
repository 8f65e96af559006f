"""PreferenceModule runs the LM head only from the first scored position (``logits_to_keep``).

Every number the step produces from the sliced logits (per-token log-probs, sequence sums, the DPO
loss, ADPO signals and masks, the cached reference) must equal the same number computed from a
plain full forward over every position, written out independently here (``log_softmax`` + a
gather loop, per row and position), on a ragged batch: rows with different prompt AND response
lengths, with padding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from equilibrate_pl.algorithms.ama import ADPOSettings
from equilibrate_pl.algorithms.logprobs import first_scored_position, tail_token_logprobs, token_logprobs
from equilibrate_pl.models.forward import _forward_parameters, accepts_logits_to_keep
from equilibrate_pl.modules.common import ModelSettings
from equilibrate_pl.modules.preference import PreferenceModule
from tests.modules.test_preference import perturb

BETA = 0.5
TOL = dict(rtol=0.0, atol=1e-6)
# Sequence sums reach ~40 in float32, whose spacing there is 4e-6: 1e-6 relative.
SUM_TOL = dict(rtol=1e-6, atol=1e-6)
# (prompt length, chosen response length, rejected response length) per pair. The shortest prompt
# (2 tokens) sits in the middle row, so the kept window is set by neither the first nor the last row.
SPECS = [(7, 3, 5), (2, 6, 1), (9, 2, 4)]


@pytest.fixture(autouse=True)
def _cache(equilibrate_cache: Path) -> None:
    """The built-in tiny model and tokenizer live in the session's cache directory."""


def ragged_batch(pad_id: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A right-padded preference batch: chosen and rejected rows of different widths."""
    g = torch.Generator().manual_seed(seed)
    batch: dict[str, Any] = {}
    for side, col in (("chosen", 1), ("rejected", 2)):
        width = max(spec[0] + spec[col] for spec in SPECS)
        ids = torch.full((len(SPECS), width), pad_id)
        labels = torch.full((len(SPECS), width), -100)
        attn = torch.zeros((len(SPECS), width), dtype=torch.long)
        for i, spec in enumerate(SPECS):
            n_prompt, n = spec[0], spec[0] + spec[col]
            ids[i, :n] = torch.randint(3, vocab, (n,), generator=g)  # above the special ids
            attn[i, :n] = 1
            labels[i, n_prompt:n] = ids[i, n_prompt:n]
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": attn, f"{side}_labels": labels})
    batch["index"] = torch.arange(len(SPECS))
    return batch


def full_forward_logps(model: torch.nn.Module, ids: torch.Tensor, attn: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, L-1) reference: every position's logits, log_softmax, then a loop picking each scored token."""
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=ids, attention_mask=attn).logits.double(), dim=-1)
    out = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.float64)
    for i in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if labels[i, t + 1] != -100:
                out[i, t] = logp[i, t, labels[i, t + 1]]
    return out


def stacked(batch: dict[str, torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chosen rows then rejected rows, right-padded to one width (written out, not ``stack_pairs``)."""
    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    out = []
    for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("labels", -100)):
        parts = [F.pad(batch[f"{side}_{key}"], (0, width - batch[f"{side}_{key}"].shape[1]), value=fill) for side in ("chosen", "rejected")]
        out.append(torch.cat(parts))
    return out[0], out[1], out[2]


def head_widths(model: torch.nn.Module) -> tuple[list[int], Any]:
    """Records the number of positions each forward's LM head sees."""
    widths: list[int] = []
    handle = model.get_output_embeddings().register_forward_hook(lambda mod, args, out: widths.append(args[0].shape[1]))
    return widths, handle


def expected_loss(module: PreferenceModule, batch: dict[str, torch.Tensor], reference: Any, ama: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, keep)``: DPO / ADPO from full forwards, written out (baseline zero)."""
    ids, attn, labels = stacked(batch, module.tokenizer.pad_token_id)
    pol = full_forward_logps(module.model, ids, attn, labels)
    ref = reference(ids, attn, labels)
    scored = labels[:, 1:] != -100
    keep = scored.clone()
    if ama == "implicit":  # a frozen pi*'s log-ratio to the reference, never the policy's own
        signal = BETA * (full_forward_logps(module.implicit_model, ids, attn, labels) - ref)
        b = len(SPECS)
        for i in range(2 * b):
            row = scored[i] & ((signal[i] > 0) if i < b else (signal[i] < 0))
            keep[i] = row if row.any() else scored[i]  # nothing kept: the row falls back to all tokens
    sums_pol, sums_ref = (pol * keep).sum(-1), (ref * keep).sum(-1)
    pc, pr = sums_pol.chunk(2)
    rc, rr = sums_ref.chunk(2)
    return -F.logsigmoid(BETA * ((pc - rc) - (pr - rr))).mean(), keep


def test_first_scored_position_and_tail_logprobs_by_hand() -> None:
    mask = torch.tensor([[1, 0, 0, 1, 1, 0], [0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    # mask[:, 0] is never scored (nothing predicts token 0): row 1's token 2 needs logit 1.
    assert first_scored_position(mask) == 1
    assert first_scored_position(torch.zeros(2, 6, dtype=torch.bool)) == 5
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 6))
    full = token_logprobs(logits, labels, mask)
    torch.testing.assert_close(tail_token_logprobs(logits[:, 1:], labels, mask), full, rtol=0, atol=0)
    torch.testing.assert_close(tail_token_logprobs(logits, labels, mask), full, rtol=0, atol=0)
    # One position too few would silently drop row 1's first token: refused.
    with pytest.raises(ValueError, match="keep at least 5 positions"):
        tail_token_logprobs(logits[:, 2:], labels, mask)
    empty = torch.zeros_like(mask)
    assert torch.equal(tail_token_logprobs(logits[:, -1:], labels, empty), torch.zeros(2, 5, dtype=torch.float64))


def test_gradient_matches_autograd_log_softmax() -> None:
    """The log-prob's hand-written backward against autograd through ``log_softmax`` (float64)."""
    torch.manual_seed(1)
    logits = torch.randn(3, 7, 13, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 13, (3, 7))
    mask = torch.rand(3, 7) > 0.3
    weights = torch.randn(3, 6, dtype=torch.float64)
    (token_logprobs(logits, labels, mask) * weights).sum().backward()
    expected_logits = logits.detach().clone().requires_grad_(True)
    picked = F.log_softmax(expected_logits[:, :-1], -1).gather(-1, labels[:, 1:].unsqueeze(-1)).squeeze(-1)
    (picked * mask[:, 1:] * weights).sum().backward()
    torch.testing.assert_close(logits.grad, expected_logits.grad, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda z: token_logprobs(z, labels, mask), (logits.detach().requires_grad_(True),))


@pytest.mark.parametrize("ama", [None, "implicit"], ids=["dpo", "adpo-implicit"])
def test_sliced_step_equals_full_forward_with_a_frozen_copy(ama: str | None, implicit_model_dir: str) -> None:
    # The stacked path (chosen and rejected as separate rows); tests/modules/test_prefix_sharing.py
    # checks the packed one against the same full forward.
    module = PreferenceModule(beta=BETA, ama=ADPOSettings(enabled=ama is not None, token_signal=ama or "implicit"),
                              implicit_model=implicit_model_dir, share_prompt=False)
    assert module.reference is not None and accepts_logits_to_keep(module.model)
    perturb(module.model)
    batch = ragged_batch(module.tokenizer.pad_token_id, len(module.tokenizer))
    ids, attn, labels = stacked(batch, module.tokenizer.pad_token_id)
    pairs = module.stack(batch)

    widths, handle = head_widths(module.model)
    policy = module.policy_token_logprobs(pairs)
    handle.remove()
    # The shortest prompt is 2 tokens: its first response token (position 2) needs logit 1, so
    # positions 1 .. L-1 are kept and the head never sees position 0.
    assert widths == [ids.shape[1] - 1]
    expected_pol = full_forward_logps(module.model, ids, attn, labels)
    torch.testing.assert_close(policy.double(), expected_pol, **TOL)
    assert policy.requires_grad
    reference = module.reference_token_logprobs(pairs)
    expected_ref = full_forward_logps(module.reference, ids, attn, labels)
    torch.testing.assert_close(reference.double(), expected_ref, **TOL)
    torch.testing.assert_close(policy.sum(-1).double(), expected_pol.sum(-1), **SUM_TOL)
    # The comparison sees an off-by-one: the same values one position later are far off.
    assert (F.pad(policy, (1, 0))[:, :-1].double() - expected_pol).abs().max() > 1e-2

    loss, stats = module.compute_loss(batch)
    want, keep = expected_loss(module, batch, lambda i, a, lab: full_forward_logps(module.reference, i, a, lab), ama)
    torch.testing.assert_close(loss.double(), want, **TOL)
    if ama:
        signal = module.compute_token_signal(batch, pairs, policy, reference, module.reference_values(batch, pairs, "train"))
        got_keep, _ = module.compute_masks(signal, pairs["labels"][:, 1:] != -100)
        assert torch.equal(got_keep.bool(), keep)
        assert 0.0 < float(stats["kept_chosen"]) < 1.0  # the mask really selects tokens


def test_sliced_step_equals_full_forward_with_lora_and_the_adapter_disabled(implicit_model_dir: str) -> None:
    module = PreferenceModule(model=ModelSettings(lora={"r": 4, "alpha": 8}), reference="adapter_disabled", beta=BETA,
                              ama=ADPOSettings(enabled=True, token_signal="implicit"), implicit_model=implicit_model_dir,
                              share_prompt=False)
    assert module.reference is None and accepts_logits_to_keep(module.model)
    perturb(module.model)  # the adapter moves: the disabled reference must not see it
    batch = ragged_batch(module.tokenizer.pad_token_id, len(module.tokenizer), seed=3)
    ids, attn, labels = stacked(batch, module.tokenizer.pad_token_id)
    pairs = module.stack(batch)

    def base_logps(i: torch.Tensor, a: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        with module.model.disable_adapter():
            return full_forward_logps(module.model, i, a, lab)

    widths, handle = head_widths(module.model)
    policy, reference = module.policy_token_logprobs(pairs), module.reference_token_logprobs(pairs)
    handle.remove()
    assert widths == [ids.shape[1] - 1] * 2
    expected_pol, expected_ref = full_forward_logps(module.model, ids, attn, labels), base_logps(ids, attn, labels)
    assert (expected_pol - expected_ref).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(policy.double(), expected_pol, **TOL)
    torch.testing.assert_close(reference.double(), expected_ref, **TOL)
    loss, _ = module.compute_loss(batch)
    torch.testing.assert_close(loss.double(), expected_loss(module, batch, base_logps, "implicit")[0], **TOL)


def test_precomputed_reference_from_sliced_logits(tmp_path: Path) -> None:
    module = PreferenceModule(beta=BETA, precompute_reference=True, cache_dir=str(tmp_path))
    batch = ragged_batch(module.tokenizer.pad_token_id, len(module.tokenizer), seed=5)
    assert module.precompute({"train": [batch]}) == len(SPECS)
    perturb(module.model)  # the cache must hold the reference, not the moved policy
    calls: list[int] = []
    module.reference_token_logprobs = lambda pairs: calls.append(1)  # type: ignore[method-assign]
    loss, _ = module.compute_loss(batch, "train")
    assert not calls
    want, _ = expected_loss(module, batch, lambda i, a, lab: full_forward_logps(module.reference, i, a, lab), None)
    torch.testing.assert_close(loss.double(), want, **TOL)


class NoKeepArgument(torch.nn.Module):
    """A causal LM whose forward has no ``logits_to_keep`` (it would reject the argument)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if "logits_to_keep" in kwargs:
            raise TypeError("unexpected keyword argument 'logits_to_keep'")
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def test_a_forward_without_logits_to_keep_gets_every_position() -> None:
    module = PreferenceModule(beta=BETA)
    perturb(module.model)
    batch = ragged_batch(module.tokenizer.pad_token_id, len(module.tokenizer), seed=7)
    ids, attn, labels = stacked(batch, module.tokenizer.pad_token_id)
    sliced_loss = module.compute_loss(batch)[0]
    module.model, module.reference = NoKeepArgument(module.model), NoKeepArgument(module.reference)
    assert not accepts_logits_to_keep(module.model)
    _forward_parameters.cache_clear()
    widths, handle = head_widths(module.model.inner)
    loss = module.compute_loss(batch)[0]
    module.compute_loss(batch)
    handle.remove()
    assert widths == [ids.shape[1]] * 2  # full forwards
    # The signature is read once per class, not on every step.
    assert _forward_parameters.cache_info().misses == 1
    torch.testing.assert_close(loss, sliced_loss, **TOL)
    torch.testing.assert_close(module.policy_token_logprobs(module.stack(batch)).double(),
                               full_forward_logps(module.model.inner, ids, attn, labels), **TOL)


def test_left_padded_rows_keep_the_same_window() -> None:
    """The window is found from the labels, whatever the padding side (left-padded rows are not
    packed: ``share_prompt`` falls back to stacked rows)."""
    module = PreferenceModule(beta=BETA)
    batch = ragged_batch(module.tokenizer.pad_token_id, len(module.tokenizer), seed=9)
    ids, attn, labels = stacked(batch, module.tokenizer.pad_token_id)
    lengths = attn.sum(-1)
    width = ids.shape[1]
    left = [torch.stack([t[i].roll(int(width - lengths[i])) for i in range(t.shape[0])]) for t in (ids, attn, labels)]
    widths, handle = head_widths(module.model)
    got = module.policy_token_logprobs({"input_ids": left[0], "attention_mask": left[1], "labels": left[2]})
    handle.remove()
    first = min(int((row != -100).nonzero()[0]) for row in left[2])
    assert widths == [width - (first - 1)] and widths[0] < width
    torch.testing.assert_close(got.double(), full_forward_logps(module.model, *left), **TOL)


def test_reference_logits_are_freed_before_the_policy_forward(implicit_model_dir: str) -> None:
    import weakref

    module = PreferenceModule(model=ModelSettings(lora={"r": 4, "alpha": 8}), reference="adapter_disabled", beta=BETA,
                              ama=ADPOSettings(enabled=True, token_signal="implicit"), implicit_model=implicit_model_dir)
    batch = ragged_batch(module.tokenizer.pad_token_id, len(module.tokenizer), seed=11)
    reference_outputs: list[weakref.ref] = []
    alive_at_call: list[bool] = []

    def hook(mod: torch.nn.Module, args: Any, out: torch.Tensor) -> None:
        alive_at_call.append(any(ref() is not None for ref in reference_outputs))
        if not out.requires_grad:  # the reference runs without grad; the policy's logits stay for backward
            reference_outputs.append(weakref.ref(out))

    handle = module.model.get_output_embeddings().register_forward_hook(hook)
    module.compute_loss(batch)
    handle.remove()
    # Reference head(s), then the policy head(s): no reference logits were alive at any later call.
    assert reference_outputs and len(alive_at_call) > len(reference_outputs)
    assert not any(alive_at_call)

"""PreferenceModule with ``share_prompt``: each pair runs as one packed row, its prompt computed once.

The reference is a plain full forward over the stacked rows, every position, log_softmax and a
gather loop (``test_preference_logits.full_forward_logps``): per-token log-probs, the loss and the
gradients of the packed step must equal it, for a frozen-copy reference, a LoRA policy with its
adapter disabled as reference, and eager attention; models that cannot take the packed mask fall
back to stacked rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from equilibrate_pl.algorithms.ama import ADPOSettings
from equilibrate_pl.models.forward import can_run_packed, pack_for
from equilibrate_pl.modules.common import ModelSettings
from equilibrate_pl.modules.preference import PreferenceModule
from tests.modules.test_preference import perturb
from tests.modules.test_preference_logits import BETA, SUM_TOL, TOL, expected_loss, full_forward_logps, stacked

# (prompt, chosen response, rejected response) token counts, and how many leading response tokens
# the two sides share. Pair 1's rejected response is a prefix of its chosen one.
SPECS = [(7, 3, 5, 0), (2, 6, 2, 2), (9, 2, 4, 1)]


@pytest.fixture(autouse=True)
def _cache(equilibrate_cache: Path) -> None:
    """The built-in tiny model and tokenizer live in the session's cache directory."""


def shared_prompt_batch(pad_id: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded pairs whose chosen and rejected rows start with the same prompt tokens."""
    g = torch.Generator().manual_seed(seed)
    rows: dict[str, list[torch.Tensor]] = {"chosen": [], "rejected": []}
    for n_prompt, n_c, n_r, n_same in SPECS:
        prompt = torch.randint(3, vocab, (n_prompt,), generator=g)
        chosen = torch.randint(3, vocab, (n_c,), generator=g)
        rejected = torch.randint(3, vocab, (n_r,), generator=g)
        rejected[:n_same] = chosen[:n_same]
        if n_same < min(n_c, n_r):
            rejected[n_same] = (chosen[n_same] + 1 - 3) % (vocab - 3) + 3  # really differ there
        rows["chosen"].append(torch.cat([prompt, chosen]))
        rows["rejected"].append(torch.cat([prompt, rejected]))
    batch: dict[str, Any] = {}
    for side, seqs in rows.items():
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id)
        labels = torch.full((len(seqs), width), -100)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (seq, spec) in enumerate(zip(seqs, SPECS)):
            ids[i, : len(seq)], attn[i, : len(seq)] = seq, 1
            labels[i, spec[0] : len(seq)] = seq[spec[0] :]
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": attn, f"{side}_labels": labels})
    batch["index"] = torch.arange(len(SPECS))
    return batch


def input_shapes(model: torch.nn.Module) -> tuple[list[tuple[int, ...]], Any]:
    """Records the (rows, width) of every forward through ``model``'s input embeddings."""
    shapes: list[tuple[int, ...]] = []
    hook = model.get_input_embeddings().register_forward_hook(lambda mod, args, out: shapes.append(tuple(args[0].shape)))
    return shapes, hook


def grads(module: PreferenceModule, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module.zero_grad(set_to_none=True)
    loss, _ = module.compute_loss(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_step_equals_full_forward_with_a_frozen_copy(attention: str, implicit_model_dir: str) -> None:
    module = PreferenceModule(beta=BETA, ama=ADPOSettings(enabled=True, token_signal="implicit"), length_groups=1,
                              implicit_model=implicit_model_dir)
    for model in (module.model, module.reference, module.implicit_model):
        model.set_attn_implementation(attention)
    assert module.share_prompt and can_run_packed(module.model)
    perturb(module.model)
    batch = shared_prompt_batch(module.tokenizer.pad_token_id, len(module.tokenizer))
    ids, attn, labels = stacked(batch, module.tokenizer.pad_token_id)
    pairs = module.stack(batch)
    packed = pack_for(module.model, pairs, module.tokenizer.pad_token_id)
    # The last common token opens both branches: prompt + shared response tokens - 1.
    assert packed is not None and packed.shared.tolist() == [spec[0] + spec[3] - 1 for spec in SPECS]

    shapes, hook = input_shapes(module.model)
    policy = module.policy_token_logprobs(pairs)
    hook.remove()
    # One row per pair, as wide as the widest prompt + both responses, not 2B stacked rows.
    assert shapes == [(len(SPECS), max((p + c) + (p + r) - (p + s - 1) for p, c, r, s in SPECS))]
    assert shapes[0][0] * shapes[0][1] < ids.numel()
    expected_pol = full_forward_logps(module.model, ids, attn, labels)
    torch.testing.assert_close(policy.double(), expected_pol, **TOL)
    torch.testing.assert_close(policy.sum(-1).double(), expected_pol.sum(-1), **SUM_TOL)
    reference = module.reference_token_logprobs(pairs)
    torch.testing.assert_close(reference.double(), full_forward_logps(module.reference, ids, attn, labels), **TOL)

    loss, _ = module.compute_loss(batch)
    want, _ = expected_loss(module, batch, lambda i, a, lab: full_forward_logps(module.reference, i, a, lab), "implicit")
    torch.testing.assert_close(loss.double(), want, **TOL)


def test_packed_gradients_equal_the_stacked_ones_with_lora(implicit_model_dir: str) -> None:
    module = PreferenceModule(model=ModelSettings(lora={"r": 4, "alpha": 8}), reference="adapter_disabled", beta=BETA,
                              ama=ADPOSettings(enabled=True, token_signal="implicit"), implicit_model=implicit_model_dir)
    perturb(module.model)
    batch = shared_prompt_batch(module.tokenizer.pad_token_id, len(module.tokenizer), seed=3)
    ids, attn, labels = stacked(batch, module.tokenizer.pad_token_id)
    pairs = module.stack(batch)
    with module.model.disable_adapter():
        expected_ref = full_forward_logps(module.model, ids, attn, labels)
    assert (full_forward_logps(module.model, ids, attn, labels) - expected_ref).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(module.reference_token_logprobs(pairs).double(), expected_ref, **TOL)

    shapes, hook = input_shapes(module.model)
    packed_loss, packed_grads = grads(module, batch)
    hook.remove()
    # Reference and policy forwards both packed, each in two length groups cut to their longest
    # row: pairs 0 and 2 (16 and 15 packed positions), then pair 1 (9).
    assert shapes == [(2, 16), (1, 9)] * 2
    module.share_prompt = False
    stacked_loss, stacked_grads = grads(module, batch)
    torch.testing.assert_close(packed_loss, stacked_loss, **TOL)
    assert packed_grads.keys() == stacked_grads.keys() and packed_grads
    for name, g in packed_grads.items():
        torch.testing.assert_close(g, stacked_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_models_that_cannot_take_the_packed_mask_run_stacked_rows() -> None:
    module = PreferenceModule(beta=BETA)
    batch = shared_prompt_batch(module.tokenizer.pad_token_id, len(module.tokenizer), seed=5)
    ids, attn, labels = stacked(batch, module.tokenizer.pad_token_id)
    pairs = module.stack(batch)
    config = module.model.config
    # A sliding window narrower than the packed row would be lost under a custom 4-D mask.
    config.sliding_window = 4
    assert pack_for(module.model, pairs, module.tokenizer.pad_token_id) is None
    shapes, hook = input_shapes(module.model)
    got = module.policy_token_logprobs(pairs)
    hook.remove()
    assert shapes == [tuple(ids.shape)]
    torch.testing.assert_close(got.double(), full_forward_logps(module.model, ids, attn, labels), **TOL)
    config.sliding_window = 10_000
    assert pack_for(module.model, pairs, module.tokenizer.pad_token_id) is not None
    # Attention kernels that take no 4-D mask (flash, flex) are never given one.
    config._attn_implementation = "flash_attention_2"
    assert not can_run_packed(module.model) and pack_for(module.model, pairs, module.tokenizer.pad_token_id) is None


def test_several_processes_run_one_packed_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under FSDP every forward all-gathers: a data-dependent number of forwards per rank would hang."""
    module = PreferenceModule(beta=BETA)
    batch = shared_prompt_batch(module.tokenizer.pad_token_id, len(module.tokenizer), seed=7)
    pairs = module.stack(batch)
    shapes, hook = input_shapes(module.model)
    with torch.no_grad():
        alone = module.policy_token_logprobs(pairs)
        assert len(shapes) == 2  # one process: two length groups
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
        shapes.clear()
        torch.testing.assert_close(module.policy_token_logprobs(pairs), alone, **TOL)
    hook.remove()
    assert len(shapes) == 1

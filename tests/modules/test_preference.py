"""PreferenceModule: exact DPO when AMA is off, ADPO masks against a per-row loop, reference options,
the precomputed cache, start-up checks, non-finite handling and a tiny end-to-end run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from equilibrate_pl.algorithms.ama import ADPOSettings
from equilibrate_pl.algorithms.dpo import dpo_loss
from equilibrate_pl.modules.common import ModelSettings, OptimSettings
from equilibrate_pl.modules.preference import PreferenceModule

BETA = 0.5


@pytest.fixture(scope="module")
def records(equilibrate_cache: Path) -> list[dict[str, Any]]:
    from equilibrate_pl.data.world import build_world

    return build_world(seed=0, size="tiny").preference_records("train")[:4]


def make_batch(module: PreferenceModule, records: list[dict[str, Any]], signal: bool = False) -> dict[str, Any]:
    from equilibrate_pl.data.collate import build_collator

    collator = build_collator("preference", module.tokenizer, max_length=96, max_prompt_length=48)
    if signal:
        # A per-token column in the data: +1 on even, -1 on odd response tokens (eos included), so the
        # masks depend on exact alignment.
        records = [dict(r) for r in records]
        for r in records:
            for side in ("chosen", "rejected"):
                n = len(module.tokenizer(r[side], add_special_tokens=False)["input_ids"]) + 1
                r[f"{side}_token_signal"] = [1.0 if k % 2 == 0 else -1.0 for k in range(n)]
    return collator.collate_records(records)


def perturb(model: torch.nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    """Move the policy away from the reference so log-ratios are not all zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def loop_token_logps(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> list[dict[int, float]]:
    """Per row, unpadded, one forward each: {position j: log p(token j | tokens < j)} over labelled j."""
    out = []
    with torch.no_grad():
        for i in range(ids.shape[0]):
            n = int(mask[i].sum())
            logits = model(input_ids=ids[i : i + 1, :n]).logits[0].float()
            lp = F.log_softmax(logits, -1)
            out.append({j: float(lp[j - 1, ids[i, j]]) for j in range(1, n) if labels[i, j] != -100})
    return out


def loop_dpo(module: PreferenceModule, batch: dict[str, Any], signals: dict[str, list[dict[int, float]]] | None) -> torch.Tensor:
    """DPO / ADPO loss written out per row: keep chosen tokens with r > 0, rejected with r < 0."""
    reference = module.reference
    sums: dict[tuple[str, str], list[float]] = {}
    for side in ("chosen", "rejected"):
        ids, labels, mask = (batch[f"{side}_{k}"] for k in ("input_ids", "labels", "attention_mask"))
        pol = loop_token_logps(module.model, ids, labels, mask)
        ref = loop_token_logps(reference, ids, labels, mask)
        for name, rows in (("policy", pol), ("reference", ref)):
            row_sums = []
            for i, row in enumerate(rows):
                if signals is None:
                    keep = set(row)
                else:
                    r = signals[side][i]
                    keep = {j for j in row if (r[j] > 0 if side == "chosen" else r[j] < 0)} or set(row)
                row_sums.append(sum(row[j] for j in keep))
            sums[(name, side)] = row_sums
    t = {k: torch.tensor(v) for k, v in sums.items()}
    return dpo_loss(t[("policy", "chosen")], t[("policy", "rejected")], t[("reference", "chosen")],
                    t[("reference", "rejected")], BETA).mean()


def test_ama_disabled_is_exactly_dpo(records: list[dict[str, Any]], implicit_model_dir: str) -> None:
    module = PreferenceModule(beta=BETA, ama=ADPOSettings(enabled=False))
    perturb(module.model)
    batch = make_batch(module, records)
    loss, stats = module.compute_loss(batch)
    torch.testing.assert_close(loss, loop_dpo(module, batch, None), rtol=1e-5, atol=1e-5)
    assert float(stats["kept_chosen"]) == 1.0 and int(stats["fallbacks_chosen"]) == 0
    # ADPO with the mask forced to keep everything (a subclass) gives the same loss: the mask is the only change.
    class KeepAll(PreferenceModule):
        def compute_masks(self, signal, token_mask):
            return token_mask, torch.zeros(token_mask.shape[0], dtype=torch.bool)

    adpo = KeepAll(beta=BETA, ama=ADPOSettings(enabled=True, token_signal="implicit"), implicit_model=implicit_model_dir)
    adpo.model.load_state_dict(module.model.state_dict())
    torch.testing.assert_close(adpo.compute_loss(batch)[0], loss, rtol=0, atol=0)


def test_nll_weight_adds_the_chosen_token_mean_nll(records: list[dict[str, Any]], implicit_model_dir: str) -> None:
    """RPO: loss = DPO + w * (mean over chosen tokens of -log p), per row, all chosen tokens."""
    adpo = ADPOSettings(enabled=True, token_signal="implicit")
    module = PreferenceModule(beta=BETA, nll_weight=0.7, ama=adpo, implicit_model=implicit_model_dir)
    perturb(module.model)
    batch = make_batch(module, records)
    loss, stats = module.compute_loss(batch)
    plain = PreferenceModule(beta=BETA, ama=adpo, implicit_model=implicit_model_dir)
    plain.model.load_state_dict(module.model.state_dict())
    ids, labels, mask = (batch[f"chosen_{k}"] for k in ("input_ids", "labels", "attention_mask"))
    nll = torch.tensor([-sum(row.values()) / len(row) for row in loop_token_logps(module.model, ids, labels, mask)])
    torch.testing.assert_close(stats["nll_chosen"], nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, plain.compute_loss(batch)[0] + 0.7 * nll.mean(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="nll_weight"):
        PreferenceModule(nll_weight=-1.0)


def test_adpo_field_signal_against_loop(records: list[dict[str, Any]]) -> None:
    module = PreferenceModule(beta=BETA, ama=ADPOSettings(enabled=True, token_signal="field"))
    perturb(module.model)
    batch = make_batch(module, records, signal=True)
    signals = {
        side: [{j: float(batch[f"{side}_token_signal"][i, j]) for j in range(batch[f"{side}_labels"].shape[1])}
               for i in range(len(records))]
        for side in ("chosen", "rejected")
    }
    loss, stats = module.compute_loss(batch)
    torch.testing.assert_close(loss, loop_dpo(module, batch, signals), rtol=1e-5, atol=1e-5)
    assert 0.3 < float(stats["kept_chosen"]) < 0.7


@pytest.fixture(scope="module")
def reward_dir(equilibrate_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from equilibrate_pl.models import load_scalar_model

    model, tokenizer = load_scalar_model("builtin:tiny", head_seed=3)
    with torch.no_grad():  # a head with a visible spread of scores
        model.score.weight.mul_(30.0)
    out = tmp_path_factory.mktemp("rm")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_adpo_dense_reward_alignment_against_loop(records: list[dict[str, Any]], reward_dir: Path) -> None:
    module = PreferenceModule(beta=BETA, ama=ADPOSettings(enabled=True, token_signal="dense_reward"), reward_model=str(reward_dir))
    perturb(module.model)
    batch = make_batch(module, records)
    signals: dict[str, list[dict[int, float]]] = {}
    for side in ("chosen", "rejected"):
        ids, mask = batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"]
        rows = []
        with torch.no_grad():
            for i in range(ids.shape[0]):
                n = int(mask[i].sum())
                s = module.reward_model(input_ids=ids[i : i + 1, :n]).logits[0, :, 0]
                rows.append({j: float(s[j] - s[j - 1]) for j in range(1, n)})  # reward of token j
        signals[side] = rows
    loss, stats = module.compute_loss(batch)
    torch.testing.assert_close(loss, loop_dpo(module, batch, signals), rtol=1e-5, atol=1e-5)
    assert 0.0 < float(stats["kept_chosen"]) < 1.0 and 0.0 < float(stats["kept_rejected"]) < 1.0


def test_adapter_disabled_reference_equals_frozen_copy(records: list[dict[str, Any]]) -> None:
    lora = {"r": 4, "alpha": 8}
    disabled = PreferenceModule(model=ModelSettings(lora=lora), reference="adapter_disabled")
    copy = PreferenceModule(model=ModelSettings(lora=lora), reference="copy")
    assert disabled.reference is None
    perturb(disabled.model)  # train the adapter a bit: the disabled reference must not see it
    batch = make_batch(disabled, records)
    pairs = disabled.stack(batch)
    torch.testing.assert_close(disabled.reference_token_logprobs(pairs), copy.reference_token_logprobs(pairs))
    assert not torch.allclose(disabled.policy_token_logprobs(pairs), disabled.reference_token_logprobs(pairs))
    with pytest.raises(ValueError, match="needs a LoRA policy"):
        PreferenceModule(reference="adapter_disabled")


def test_precomputed_cache_gives_the_same_loss_and_is_reused(records: list[dict[str, Any]], reward_dir: Path, tmp_path: Path) -> None:
    kwargs = dict(beta=BETA, ama=ADPOSettings(enabled=True, token_signal="dense_reward", baseline="batch_mean"),
                  reward_model=str(reward_dir))
    live = PreferenceModule(**kwargs)
    cached = PreferenceModule(**kwargs, precompute_reference=True, cache_dir=str(tmp_path))
    cached.model.load_state_dict(live.model.state_dict())
    batch = make_batch(live, records)
    loader = [make_batch(live, records[:2]), {**make_batch(live, records[2:]), "index": torch.tensor([2, 3])}]
    assert cached.precompute({"train": loader}) == 4
    path = cached.cache_path()
    cached.reference_cache.save(path)
    calls = []
    cached.reference_token_logprobs = lambda pairs: calls.append(1)  # type: ignore[method-assign]
    perturb(live.model)
    perturb(cached.model)
    torch.testing.assert_close(cached.compute_loss(batch, "train")[0], live.compute_loss(batch, "train")[0])
    assert not calls  # the reference was not run
    fresh = PreferenceModule(**kwargs, precompute_reference=True, cache_dir=str(tmp_path))
    assert fresh.reference_cache.load(path) == 4
    assert fresh.precompute({"train": loader}) == 0
    # Different tokens under the same index are recomputed, not served from the cache.
    other = make_batch(live, records[1:4])
    assert fresh.precompute({"train": [other]}) == 3


def test_reward_model_tokenizer_mismatch_fails_at_start_up(reward_dir: Path, tmp_path: Path) -> None:
    from equilibrate_pl.models import load_scalar_model

    model, tokenizer = load_scalar_model(str(reward_dir))
    tokenizer.add_tokens(["<|extra|>"])
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="policy and reward model tokenizers do not match"):
        PreferenceModule(ama=ADPOSettings(enabled=True, token_signal="dense_reward"), reward_model=str(tmp_path))
    with pytest.raises(ValueError, match="needs reward_model"):
        PreferenceModule(ama=ADPOSettings(enabled=True, token_signal="dense_reward"))


class _NaNAfter(PreferenceModule):
    """Injects a NaN loss from the 3rd training step on."""

    def compute_loss(self, batch: dict[str, Any], split: str = "train") -> Any:
        loss, stats = super().compute_loss(batch, split)
        if split == "train" and self.global_step >= 2:
            loss = loss * float("nan")
        return loss, stats


def _world_data(batch_size: int = 8) -> Any:
    from equilibrate_pl.data import SafetyDataModule

    return SafetyDataModule(stage="preference", world_scale="tiny", batch_size=batch_size, eval_batch_size=16,
                            val_size=16, max_length=96, max_prompt_length=48)


def _trainer(tmp_path: Path, max_steps: int, **kwargs: Any) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path, **kwargs)


def test_nonfinite_loss_is_skipped_then_stops(tmp_path: Path, equilibrate_cache: Path) -> None:
    L.seed_everything(0)
    module = _NaNAfter(optim=OptimSettings(lr=1e-3), max_nonfinite_steps=3)
    snapshots = []

    class Snap(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            snapshots.append(pl_module.model.model.embed_tokens.weight.detach().clone())

    with pytest.raises(RuntimeError, match="non-finite loss .* 3 steps in a row"):
        _trainer(tmp_path, 10, callbacks=[Snap()], limit_val_batches=0).fit(module, datamodule=_world_data())
    assert len(snapshots) == 4  # 2 good steps, 2 skipped, the 3rd NaN raised
    assert not torch.equal(snapshots[0], snapshots[1])
    assert torch.equal(snapshots[1], snapshots[2]) and torch.equal(snapshots[2], snapshots[3])  # skipped: untouched
    assert module.guard.total_skipped == 3


@pytest.mark.parametrize("ama", [False, True], ids=["dpo", "adpo"])
def test_tiny_run_grows_the_validation_margin(ama: bool, tmp_path: Path, equilibrate_cache: Path, implicit_model_dir: str) -> None:
    L.seed_everything(0)
    module = PreferenceModule(optim=OptimSettings(lr=1e-3, warmup_steps=2), beta=0.1,
                              ama=ADPOSettings(enabled=ama, token_signal="implicit", baseline="batch_mean"),
                              implicit_model=implicit_model_dir, precompute_reference=ama)
    data = _world_data()
    trainer = _trainer(tmp_path, 16, val_check_interval=16, check_val_every_n_epoch=None)
    before = trainer.validate(module, datamodule=data, verbose=False)[0]
    trainer.fit(module, datamodule=data)
    after = trainer.callback_metrics
    assert abs(before["val/margin"]) < 1e-4  # policy == reference at the start
    assert float(after["val/margin"]) > 0.2
    assert float(after["val/accuracy"]) >= 0.6  # held-out pairs; 0.5 is chance
    if ama:  # the mask really selected tokens, on both sides
        assert 0.0 < float(after["train/kept_chosen"]) < 1.0
        assert 0.0 < float(after["train/kept_rejected"]) < 1.0


def _rss_mib(field: str) -> float:
    """Linux /proc/self/status field (VmRSS: now, VmHWM: peak since the last reset) in MiB; 0 elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
    except OSError:
        pass


@pytest.mark.slow
def test_one_adpo_step_on_smollm2_with_lora(equilibrate_cache: Path) -> None:
    """One ADPO step (implicit signal, adapter-disabled reference) on SmolLM2-135M-Instruct, CPU.

    Prints step time and peak resident memory (docs/TRAINING.md quotes them).
    """
    import resource
    import time

    from equilibrate_pl.data.collate import build_collator
    from equilibrate_pl.data.world import build_world

    pytest.importorskip("gguf")
    torch.manual_seed(0)
    module = PreferenceModule(
        model=ModelSettings(name_or_path="builtin:smollm2", lora={"r": 16, "alpha": 32}),
        reference="adapter_disabled", optim=OptimSettings(lr=1e-4), beta=0.1,
        # pi* = the start itself: a zero signal (every row falls back to its full mask); this test
        # measures the step's time and memory with the signal model loaded.
        ama=ADPOSettings(enabled=True, token_signal="implicit", baseline="batch_mean"), implicit_model="builtin:smollm2",
    )
    records = build_world(seed=0, size="tiny").preference_records("train")[:4]
    batch = build_collator("preference", module.tokenizer, max_length=256, max_prompt_length=128).collate_records(records)
    optimizer = module.configure_optimizers()["optimizer"]
    lora_before = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    loaded_mib = _rss_mib("VmRSS")
    _reset_peak_rss()  # measure the steps, not the one-off GGUF conversion of the first load
    times = []
    for _ in range(2):  # the first step includes one-off allocations; report both
        start = time.perf_counter()
        loss, stats = module.compute_loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    peak_mib = _rss_mib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tokens = int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
    print(f"\nSmolLM2-135M LoRA ADPO step: batch 4 pairs, {tokens} tokens, step times {[round(t, 2) for t in times]} s, "
          f"RSS after loading {loaded_mib:.0f} MiB, peak RSS during the steps {peak_mib:.0f} MiB, kept chosen {float(stats['kept_chosen']):.2f} rejected {float(stats['kept_rejected']):.2f}")
    assert torch.isfinite(loss)
    assert any(not torch.equal(p.detach(), lora_before[n]) for n, p in module.model.named_parameters() if p.requires_grad)


def test_adpo_signals_are_frozen_models_or_data(records: list[dict[str, Any]], implicit_model_dir: str, tmp_path: Path) -> None:
    """The default signal is the reward model's dense rewards; `implicit` needs a frozen model and says
    why; the frozen model's signal is cached with the reference and equals the live computation."""
    assert ADPOSettings().token_signal == "dense_reward"
    with pytest.raises(ValueError, match="needs reward_model"):
        PreferenceModule(ama=ADPOSettings(enabled=True))
    with pytest.raises(ValueError, match="needs implicit_model.*whatever the labels"):
        PreferenceModule(ama=ADPOSettings(enabled=True, token_signal="implicit"))
    adpo = ADPOSettings(enabled=True, token_signal="implicit")
    live = PreferenceModule(beta=BETA, ama=adpo, implicit_model=implicit_model_dir)
    cached = PreferenceModule(beta=BETA, ama=adpo, implicit_model=implicit_model_dir, precompute_reference=True,
                              cache_dir=str(tmp_path))
    perturb(live.model)
    cached.model.load_state_dict(live.model.state_dict())
    batch = make_batch(live, records)
    batch["index"] = torch.arange(len(records))
    first = cached.compute_loss(batch)[0]  # computes and stores the frozen values
    pairs = cached.stack(batch)
    stored = cached.reference_cache.lookup(batch, pairs, "train")
    assert stored is not None and set(stored) == {"reference", "signal"}
    torch.testing.assert_close(cached.compute_loss(batch)[0], first)  # from the cache
    torch.testing.assert_close(live.compute_loss(batch)[0], first, rtol=1e-5, atol=1e-6)
    # the signal is the frozen model's log-ratio to the reference, whatever the policy does
    expected = BETA * (live.token_logprobs(live.implicit_model, pairs) - live.reference_token_logprobs(pairs))
    torch.testing.assert_close(stored["signal"], expected.detach(), rtol=1e-5, atol=1e-6)
    assert "implicit_model." not in " ".join(live.state_dict())  # frozen models are not checkpointed

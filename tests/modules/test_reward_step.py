"""RewardModule's cheaper training step: grouped, unmasked scoring gives the per-row scores, loss and
gradients of a per-row loop with TRL's Bradley-Terry formula; what is logged at the logged steps, at
the end of training and over a validation epoch equals an independent per-row computation."""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader

from equilibrate_pl.algorithms.prefix_sharing import group_rows_by_length, right_padded_lengths
from equilibrate_pl.models.forward import is_causal_model, pack_for, stack_pairs
from equilibrate_pl.modules.common import OptimSettings, step_is_logged
from equilibrate_pl.modules.reward import RewardModule

GROUPS = ("EHD", "IHD", "MHD", "general")


# -- references -------------------------------------------------------------------------------


def loop_scores(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each row alone, without its padding (either side), scored at its last token."""
    out = []
    for i in range(ids.shape[0]):
        real = ids[i][mask[i].bool()]
        out.append(model(input_ids=real[None]).logits[0, -1, 0])
    return torch.stack(out)


def reference_stats(model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    """TRL RewardTrainer's loss formula on per-row scores, and the diagnostics written out by hand."""
    with torch.no_grad():
        c = loop_scores(model, batch["chosen_input_ids"], batch["chosen_attention_mask"])
        r = loop_scores(model, batch["rejected_input_ids"], batch["rejected_attention_mask"])
    correct = [float(ci > ri) for ci, ri in zip(c.tolist(), r.tolist())]
    per_group: dict[str, list[float]] = defaultdict(list)
    for g, ok in zip(batch["group"], correct):
        per_group[g].append(ok)
    return {
        "loss": float(-F.logsigmoid(c - r).mean()), "losses": (-F.logsigmoid(c - r)).tolist(),
        "accuracy": sum(correct) / len(correct), "correct": correct, "chosen": c.tolist(), "rejected": r.tolist(),
        "score_chosen": float(c.mean()), "score_rejected": float(r.mean()), "margin": float((c - r).mean()),
        "groups": {g: sum(v) / len(v) for g, v in per_group.items()},
    }


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batches(equilibrate_cache: Any) -> list[dict[str, Any]]:
    """Seven preference batches (sizes 6, 6, 6, 6, 6, 6, 4) of mixed FDC groups and ragged lengths."""
    from equilibrate_pl.data.collate import build_collator
    from equilibrate_pl.data.tokenizer import load_tokenizer
    from equilibrate_pl.data.world import build_world
    from equilibrate_pl.models import tiny_model_dir

    records = random.Random(0).sample(build_world(seed=0, size="tiny").preference_records("train"), 40)
    collate = build_collator("preference", load_tokenizer(str(tiny_model_dir())), max_length=96, max_prompt_length=48)
    sizes = [6, 6, 6, 6, 6, 6, 4]
    starts = [0, *itertools.accumulate(sizes)]
    return [collate.collate_records(records[a:b]) for a, b in zip(starts, starts[1:])]


def fresh_module(**kwargs: Any) -> RewardModule:
    L.seed_everything(0)
    kwargs.setdefault("prefix_weight", 0.0)  # the packed/grouped pair scoring (prefix-value training runs stacked rows)
    return RewardModule(optim=OptimSettings(lr=1e-2, scheduler="constant"), **kwargs)


# -- grouping and scores ------------------------------------------------------------------------


def padded_positions(lengths: list[int], groups: list[list[int]]) -> int:
    return sum(len(g) * max(lengths[i] for i in g) for g in groups)


def test_group_rows_by_length_partition_and_best_first_split() -> None:
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 12))]
        for k in (1, 2, 3, 5):
            groups = group_rows_by_length(lengths, k)
            assert 1 <= len(groups) <= k
            assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
            # longest first, each group a run of the sorted lengths
            flat = [lengths[i] for g in groups for i in g]
            assert flat == sorted(lengths, reverse=True)
            assert padded_positions(lengths, groups) <= len(lengths) * max(lengths)
        # two groups: the split a brute force over every cut finds, when it is worth a forward
        desc = sorted(lengths, reverse=True)
        n, top = len(desc), desc[0]
        best = min(((s * top + (n - s) * desc[s]) for s in range(1, n)), default=n * top)
        expected = best if n * top - best > 0.1 * n * top else n * top
        assert padded_positions(lengths, group_rows_by_length(lengths, 2)) == expected
    assert group_rows_by_length([7, 7, 7, 7], 4) == [[0, 1, 2, 3]]  # equal lengths: nothing to save
    assert [sorted(g) for g in group_rows_by_length([5, 90, 88, 6], 2)] == [[1, 2], [0, 3]]
    # free forwards, enough groups: no padding at all
    lengths = [3, 9, 3, 5, 9, 5]
    assert all(len({lengths[i] for i in g}) == 1 for g in group_rows_by_length(lengths, 6, forward_cost=0.0))
    with pytest.raises(ValueError, match="max_groups"):
        group_rows_by_length(lengths, 0)


def test_right_padded_lengths() -> None:
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert right_padded_lengths(right) == [3, 4, 1]
    assert right_padded_lengths(right.flip(-1)) is None  # left padding
    assert right_padded_lengths(torch.tensor([[1, 0, 1, 0]])) is None  # a hole
    with pytest.raises(ValueError, match=r"rows \[1\] have no real token"):
        right_padded_lengths(torch.tensor([[1, 1], [0, 0]]))


def test_scores_match_per_row_loop_on_every_path(batches: list[dict[str, Any]]) -> None:
    module = fresh_module()
    pairs = stack_pairs(batches[0], module.tokenizer.pad_token_id, keys=("input_ids", "attention_mask"))
    ids, mask = pairs["input_ids"], pairs["attention_mask"]
    lengths = mask.sum(-1).tolist()
    assert len(group_rows_by_length(lengths, 2)) == 2, "the batch should be ragged enough to be split"
    assert is_causal_model(module.model)  # so score takes the grouped, unmasked path
    with torch.no_grad():
        expected = loop_scores(module.model, ids, mask)
        for k in (1, 2, 3):
            module.length_groups = k
            torch.testing.assert_close(module.score(ids, mask), expected, rtol=1e-5, atol=1e-5)
        # the padded, masked forward (what score ran before grouping) agrees too
        from equilibrate_pl.models import last_token_scores

        torch.testing.assert_close(last_token_scores(module.position_scores(ids, mask), mask), expected, rtol=1e-5, atol=1e-5)
        # left padding is not right-padded: one masked forward, same scores
        left_ids, left_mask = torch.full_like(ids, module.tokenizer.pad_token_id), torch.zeros_like(mask)
        for i, n in enumerate(lengths):
            left_ids[i, ids.shape[1] - n :], left_mask[i, ids.shape[1] - n :] = ids[i, :n], 1
        assert right_padded_lengths(left_mask) is None
        torch.testing.assert_close(module.score(left_ids, left_mask), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("groups", "share_prompt"), [(1, False), (2, False), (2, True)],
                         ids=["stacked-1-group", "stacked-2-groups", "packed-pairs"])
def test_loss_and_gradients_match_trl_formula_on_per_row_scores(batches: list[dict[str, Any]], groups: int, share_prompt: bool) -> None:
    module = fresh_module(length_groups=groups, share_prompt=share_prompt)
    batch = batches[1]
    pad = module.tokenizer.pad_token_id
    packed = pack_for(module.model, stack_pairs(batch, pad), pad) if share_prompt else None
    assert (packed is not None) == share_prompt
    if packed is not None:  # the built-in world's pairs share their prompt
        assert bool((packed.shared >= 4).all())
    rows: list[int] = []
    handle = module.model.register_forward_hook(lambda mod, args, kwargs, out: rows.append(kwargs["input_ids"].shape[0]),
                                                with_kwargs=True)
    loss, stats = module.compute_loss(batch)
    handle.remove()
    n = batch["chosen_input_ids"].shape[0]
    # One row per pair when packed, split into at most `groups` forwards of similar length.
    assert sum(rows) == (n if share_prompt else 2 * n) and len(rows) <= groups
    loss.backward()
    got = {n: p.grad.clone() for n, p in module.model.named_parameters()}
    module.model.zero_grad(set_to_none=True)
    c = loop_scores(module.model, batch["chosen_input_ids"], batch["chosen_attention_mask"])
    r = loop_scores(module.model, batch["rejected_input_ids"], batch["rejected_attention_mask"])
    reference = -F.logsigmoid(c - r).mean()  # trl RewardTrainer.compute_loss
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["chosen"], c.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats["rejected"], r.detach(), rtol=1e-5, atol=1e-5)
    for name, p in module.model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


# -- logging -----------------------------------------------------------------------------------


class CaptureLogger(Logger):
    """Keeps what Lightning writes: ``(step, metrics)`` rows."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "capture"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((int(step or 0), {k: float(v) for k, v in metrics.items()}))


class Expected(L.Callback):
    """Before each training step: the step's reference values, and which keys the step logs."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.logged_keys: list[list[str]] = []
        self.step_is_logged: list[bool] = []

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.steps.append(reference_stats(module.model, batch))
        self.step_is_logged.append(step_is_logged(module))
        self.logged_keys.append([])


def assert_step_values(metrics: dict[str, Any], ref: dict[str, Any], prefix: str = "train") -> None:
    for key in ("loss", "accuracy", "score_chosen", "score_rejected", "margin"):
        assert float(metrics[f"{prefix}/{key}"]) == pytest.approx(ref[key], rel=1e-4, abs=1e-5), key
    for g, value in ref["groups"].items():
        assert float(metrics[f"{prefix}/accuracy_group/{g}"]) == pytest.approx(value, abs=1e-6), g


@pytest.mark.parametrize("progress_bar", [False, True])
def test_logged_steps_and_values_equal_a_per_row_reference(batches: list[dict[str, Any]], tmp_path: Any, progress_bar: bool) -> None:
    module = fresh_module()
    expected, logger = Expected(), CaptureLogger()
    log = module.log

    def counting_log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        expected.logged_keys[-1].append(name)
        log(name, value, *args, **kwargs)

    module.log = counting_log  # type: ignore[method-assign]
    train = batches[:5]
    trainer = L.Trainer(max_steps=len(train), log_every_n_steps=2, logger=logger, enable_checkpointing=False,
                        enable_progress_bar=progress_bar, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=tmp_path, callbacks=[expected])
    trainer.fit(module, train_dataloaders=DataLoader(train, batch_size=None, collate_fn=lambda b: b))

    # Lightning writes steps 2 and 4 (log_every_n_steps=2); step 5 ends training and feeds callback_metrics.
    assert expected.step_is_logged == [False, True, False, True, True]
    written = [(step, m) for step, m in logger.rows if "train/loss" in m]
    assert [step for step, _ in written] == [1, 3]
    for (_, metrics), ref in zip(written, [expected.steps[1], expected.steps[3]]):
        assert_step_values(metrics, ref)
    assert_step_values(trainer.callback_metrics, expected.steps[4])

    # Diagnostics cost nothing on the other steps; loss and accuracy stay live for a progress bar.
    for logged, keys in zip(expected.step_is_logged, expected.logged_keys):
        if logged:
            assert {"train/loss", "train/accuracy", "train/score_chosen", "train/margin"} <= set(keys)
            assert any(k.startswith("train/accuracy_group/") for k in keys)
        elif progress_bar:
            assert sorted(keys) == ["train/accuracy", "train/loss"]
        else:
            assert keys == []


def test_validation_epoch_values_equal_a_per_row_reference(batches: list[dict[str, Any]], tmp_path: Any) -> None:
    module = fresh_module()
    val = batches[5:]  # 6 + 4 pairs: the epoch means must weight by batch size
    refs = [reference_stats(module.model, b) for b in val]
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    (metrics,) = trainer.validate(module, dataloaders=DataLoader(val, batch_size=None, collate_fn=lambda b: b), verbose=False)

    def pooled(key: str) -> float:
        values = [v for ref in refs for v in ref[key]]
        return sum(values) / len(values)

    assert metrics["val/loss"] == pytest.approx(pooled("losses"), rel=1e-5)
    assert metrics["val/accuracy"] == pytest.approx(pooled("correct"), abs=1e-6)
    assert metrics["val/score_chosen"] == pytest.approx(pooled("chosen"), rel=1e-4, abs=1e-5)
    assert metrics["val/score_rejected"] == pytest.approx(pooled("rejected"), rel=1e-4, abs=1e-5)
    margins = [c - r for ref in refs for c, r in zip(ref["chosen"], ref["rejected"])]
    assert metrics["val/margin"] == pytest.approx(sum(margins) / len(margins), rel=1e-4, abs=1e-5)
    per_group: dict[str, list[float]] = defaultdict(list)
    for b, ref in zip(val, refs):
        for g, ok in zip(b["group"], ref["correct"]):
            per_group[g].append(ok)
    assert len(per_group) > 1
    for g, oks in per_group.items():
        assert metrics[f"val/accuracy_group/{g}"] == pytest.approx(sum(oks) / len(oks), abs=1e-6), g


def test_step_is_logged_without_a_trainer() -> None:
    module = RewardModule.__new__(RewardModule)
    L.LightningModule.__init__(module)
    assert step_is_logged(module)


def test_several_processes_always_run_one_forward(batches: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Under FSDP every forward all-gathers: a data-dependent number of forwards per rank would hang."""
    module = fresh_module()
    pairs = stack_pairs(batches[0], module.tokenizer.pad_token_id, keys=("input_ids", "attention_mask"))
    ids, mask = pairs["input_ids"], pairs["attention_mask"]
    forwards: list[int] = []
    handle = module.model.register_forward_hook(lambda *_: forwards.append(1))
    with torch.no_grad():
        alone = module.score(ids, mask)
        assert len(forwards) == 2  # one process: the ragged batch is split
        forwards.clear()
        packed_alone = module.pair_scores(batches[0])
        assert len(forwards) == 2  # and so are its packed pairs
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
        forwards.clear()
        torch.testing.assert_close(module.score(ids, mask), alone, rtol=1e-5, atol=1e-5)
        assert len(forwards) == 1
        forwards.clear()
        torch.testing.assert_close(module.pair_scores(batches[0]), packed_alone, rtol=1e-5, atol=1e-5)
        assert len(forwards) == 1
    handle.remove()

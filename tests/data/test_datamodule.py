"""SafetyDataModule end to end: mix counts, batch formats, exact resume (with workers, under a
Trainer, across epochs) and a 2-process ddp_spawn run where each rank gets its own shard."""

from __future__ import annotations

import json
import math
from itertools import islice
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from equilibrate_pl.data import SafetyDataModule
from equilibrate_pl.data.collate import IGNORE_INDEX
from equilibrate_pl.data.loaders import DataError, DataSource
from equilibrate_pl.data.world import build_world
from equilibrate_pl.distributed import destroy_process_group_at_exit


def tiny_module(**kwargs) -> SafetyDataModule:
    defaults = dict(world_scale="tiny", batch_size=8, eval_batch_size=16, max_length=96, max_prompt_length=48, val_size=16)
    return SafetyDataModule(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def preference_dm(equilibrate_cache) -> SafetyDataModule:
    dm = tiny_module()
    dm.setup()
    return dm


def batches(dm: SafetyDataModule, n: int | None = None) -> list[dict]:
    return list(islice(iter(dm.train_dataloader()), n))


def same_batches(a: list[dict], b: list[dict]) -> bool:
    def key(batch):
        return (batch["index"].tolist(), batch["chosen_input_ids"].tolist(), batch["group"])

    return [key(x) for x in a] == [key(x) for x in b]


def test_mix_counts_follow_the_paper_ratios(preference_dm):
    world = build_world(seed=0, size="tiny")
    n_general = len(world.general_pool("train"))
    counts = preference_dm.mix_result.counts
    for group, ratio in {"EHD": 25, "IHD": 75, "MHD": 150}.items():
        assert counts.get(group, 0) == math.floor(n_general / ratio + 0.5)
    assert counts["general"] == n_general
    assert len(preference_dm.train_dataset) == sum(counts.values())
    text = preference_dm.describe()
    for needle in ("EHD", "IHD", "MHD", "general", "share", "built-in world", "val: 16 rows"):
        assert needle in text


def test_preference_batches(preference_dm):
    epoch = batches(preference_dm)
    first = epoch[0]
    assert set(first) >= {"chosen_input_ids", "chosen_attention_mask", "chosen_labels", "rejected_input_ids",
                          "rejected_attention_mask", "rejected_labels", "group", "index"}
    assert first["chosen_input_ids"].shape == first["chosen_labels"].shape == first["chosen_attention_mask"].shape
    assert first["chosen_input_ids"].shape[0] == 8 and len(first["group"]) == 8
    # One epoch = every row once; each batch row's group is its record's group.
    all_idx = torch.cat([b["index"] for b in epoch]).tolist()
    assert sorted(all_idx) == list(range(len(preference_dm.train_dataset)))
    groups = [g for b in epoch for g in b["group"]]
    assert {"EHD", "IHD", "MHD", "general"} <= set(groups)
    for i, g in zip(all_idx, groups):
        assert preference_dm.train_records[i]["group"] == g
    val = next(iter(preference_dm.val_dataloader()))
    assert val["chosen_input_ids"].shape[0] == 16 and {"EHD", "IHD", "MHD"} <= set(val["group"])


def test_sft_and_prompt_stages(equilibrate_cache):
    sft = tiny_module(stage="sft")
    b = batches(sft, 1)[0]
    eos = sft.tokenizer.eos_token_id
    assert (b["labels"][:, 0] == IGNORE_INDEX).all()  # prompts are never labelled
    for labels, mask in zip(b["labels"], b["attention_mask"]):
        real = labels[mask.bool()]
        assert real[-1] == eos  # the eos closes every (untruncated) response and is labelled
    rec = sft.train_records[b["index"][0]]
    assert rec["response"]  # chosen became the response
    prompts = tiny_module(stage="prompt", mix="quota", quotas={"EHD": 3, "IHD": 2, "MHD": 1})
    p = batches(prompts, 1)[0]
    assert set(p) >= {"input_ids", "attention_mask", "prompt_text", "group", "index"}
    assert (p["attention_mask"][:, -1] == 1).all()  # left padding
    assert prompts.mix_result.counts["EHD"] == 3 and prompts.mix_result.counts["MHD"] == 1


def test_resume_continues_with_the_exact_next_batches(preference_dm, equilibrate_cache):
    uninterrupted = batches(tiny_module())
    for k in (0, 3, len(uninterrupted) - 1):
        dm = tiny_module()
        taken = batches(dm, k)
        state = dm.state_dict()
        fresh = tiny_module()
        fresh.load_state_dict(state)
        assert same_batches(taken + batches(fresh), uninterrupted)
    # A finished epoch resumes at the start of the next one (a different permutation).
    dm = tiny_module()
    batches(dm)
    fresh = tiny_module()
    fresh.load_state_dict(dm.state_dict())
    nxt = batches(fresh)
    ref = tiny_module()
    loader = ref.train_dataloader()
    list(loader)
    assert same_batches(nxt, list(loader))
    # Re-building the loader (Lightning's reload_dataloaders_every_n_epochs) continues, never replays.
    state = ref.state_dict()  # end of epoch 1
    assert same_batches(batches(ref, 2), batches(fresh_after(state), 2))
    assert (ref.state_dict()["sampler"]["epoch"], ref.state_dict()["sampler"]["position"]) == (2, 16)


def fresh_after(state: dict) -> SafetyDataModule:
    dm = tiny_module()
    dm.load_state_dict(state)
    return dm


def test_workers_give_the_same_batches_and_resume_exactly(preference_dm, equilibrate_cache):
    serial = batches(tiny_module())
    dm = tiny_module(num_workers=2)
    it = iter(dm.train_dataloader())
    taken = [next(it) for _ in range(4)]  # the workers have prefetched more than this
    state = dm.state_dict()
    assert state["sampler"]["position"] == 4 * 8
    del it
    fresh = tiny_module(num_workers=2)
    fresh.load_state_dict(state)
    assert same_batches(taken + batches(fresh), serial)


def test_other_data_refuse_to_resume(equilibrate_cache):
    dm = tiny_module()
    batches(dm, 2)
    state = dm.state_dict()
    other = tiny_module(seed=1)  # another mix of the same world
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="training data differ"):
        other.train_dataloader()


class IndexRecorder(pl.LightningModule):
    """Trains nothing useful: records the row indices of every training batch it sees."""

    def __init__(self, out_dir: str | None = None) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[int] = []
        self.out_dir = out_dir

    def training_step(self, batch, batch_idx):
        self.seen.extend(batch["index"].tolist())
        return (self.w * batch["chosen_input_ids"].float().mean()).sum()

    def configure_optimizers(self):
        # Schedulers read this; it makes Lightning build the train loader early, before the
        # checkpoint's loop state is restored (a path where resumable loaders have lost state).
        assert self.trainer.estimated_stepping_batches > 0
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def on_train_end(self) -> None:
        if self.out_dir is not None:
            Path(self.out_dir, f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))

    def setup(self, stage: str) -> None:
        # Without it a ddp_spawn rank can abort at exit after a successful fit (see the module).
        destroy_process_group_at_exit()


def trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                    num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(tmp_path))
    return pl.Trainer(**{**defaults, **kwargs})


def test_trainer_resume_from_mid_and_end_of_epoch_checkpoints(tmp_path, equilibrate_cache):
    # Checkpoints written inside on_train_batch_end (mid-epoch and on the last batch of an epoch),
    # with a worker process prefetching: the resumed run must see exactly the rest of the run.
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1, filename="{step}")
    full = IndexRecorder()
    dm = tiny_module(num_workers=1)
    trainer(tmp_path, max_epochs=2, callbacks=[ckpt], enable_checkpointing=True).fit(full, datamodule=dm)
    per_epoch = len(dm.train_dataloader())
    assert len(full.seen) == 2 * len(dm.train_dataset)
    n = len(dm.train_dataset)
    for k in (5, per_epoch, per_epoch + 5):  # mid epoch 0, end of epoch 0, mid epoch 1
        step_rows = sum(min(8, n - 8 * (b % per_epoch)) for b in range(k))
        path = tmp_path / "ckpt" / f"step={k}.ckpt"
        saved = torch.load(path, weights_only=True)["SafetyDataModule"]["sampler"]
        # What the module saved is what the Trainer had consumed in that epoch.
        assert (saved["epoch"], saved["position"]) == ((k - 1) // per_epoch, step_rows - n * ((k - 1) // per_epoch))
        resumed = IndexRecorder()
        trainer(tmp_path, max_epochs=2, enable_checkpointing=False).fit(resumed, datamodule=tiny_module(), ckpt_path=str(path))
        assert resumed.seen == full.seen[step_rows:], f"resume after step {k}"


def test_ddp_spawn_two_ranks_cover_the_dataset_once(tmp_path, equilibrate_cache):
    out = tmp_path / "seen"
    out.mkdir()
    dm = tiny_module()
    t = trainer(tmp_path, devices=2, strategy="ddp_spawn", max_epochs=1, enable_checkpointing=False)
    t.fit(IndexRecorder(str(out)), datamodule=dm)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    dm.setup()
    n = len(dm.train_dataset)
    assert len(ranks[0]) == len(ranks[1]) == math.ceil(n / 2)
    union = ranks[0] + ranks[1]
    assert set(union) == set(range(n))  # nothing lost
    assert len(union) - n == n % 2  # nothing repeated beyond torch's documented padding


def test_file_sources_holdout_and_skips(tmp_path, equilibrate_cache):
    world = build_world(seed=0, size="tiny")
    gen, saf = tmp_path / "general.jsonl", tmp_path / "safety.jsonl"
    gen.write_text("".join(json.dumps(r) + "\n" for r in world.general_pool("train")))
    rows = world.safety_pool("train")
    saf.write_text("".join(json.dumps(r) + "\n" for r in rows) + json.dumps({"prompt": "x", "group": "EHD"}) + "\n")
    dm = tiny_module(builtin_world=False, general=[DataSource(str(gen))], safety=[DataSource(str(saf))],
                     on_bad_row="skip", val_size=20, mix="all")
    dm.setup()
    text = dm.describe()
    assert "general.jsonl" in text and "safety.jsonl" in text and "1 rows skipped" in text
    train_ids = {r["id"] for r in dm.train_records}
    val_ids = {r["id"] for r in dm.val_records}
    assert len(val_ids) == 20 and not train_ids & val_ids
    assert len(train_ids | val_ids) == len(world.general_pool("train")) + len(rows)  # mode "all": nothing lost
    with pytest.raises(ValueError, match="builtin_world=False needs"):
        SafetyDataModule(builtin_world=False, general=[DataSource(str(gen))])


def test_rules_categorizer_relabels_the_unsorted_pool(equilibrate_cache):
    dm = tiny_module(categorizer="rules", mix="all")
    dm.setup()
    assert any(n.startswith("categorizer 'rules'") for n in dm._notes)
    world = build_world(seed=0, size="tiny")
    noisy = {r["id"] for r in world.safety_pool("train") if r["meta"]["noisy"]}
    relabelled = [r for r in dm.train_records if r["id"] in noisy]
    assert relabelled and any(r["group"] == "general" for r in relabelled)


def test_naive_arm_draws_scale_times_the_fdc_budget(equilibrate_cache):
    fdc = tiny_module()
    naive = tiny_module(mix="naive", naive_scale=2.0)
    fdc.setup()
    naive.setup()
    fdc_safety = sum(n for g, n in fdc.mix_result.counts.items() if g != "general")
    naive_safety = sum(n for g, n in naive.mix_result.counts.items() if g != "general")
    assert naive_safety == 2 * fdc_safety
    assert "naive: drew" in naive.describe()


def test_built_from_yaml_with_jsonargparse(tmp_path):
    from jsonargparse import ArgumentParser

    config = tmp_path / "data.yaml"
    config.write_text(
        "data:\n"
        "  class_path: equilibrate_pl.data.SafetyDataModule\n"
        "  init_args:\n"
        "    stage: sft\n"
        "    general: [{path: g.jsonl, kind: preference}]\n"
        "    safety: [{path: s.json, preset: beavertails-fdc}]\n"
        "    mix: quota\n"
        "    quotas: {EHD: 10, IHD: 3, MHD: 1}\n"
    )
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(pl.LightningDataModule, "data")
    dm = parser.instantiate(parser.parse_path(str(config))).data
    assert isinstance(dm, SafetyDataModule) and dm.stage_kind == "sft"
    assert dm.general == [DataSource(path="g.jsonl", kind="preference")]
    assert dm.safety[0].preset == "beavertails-fdc" and dm.quotas == {"EHD": 10, "IHD": 3, "MHD": 1}
    with pytest.raises(Exception, match="Literal\\['ratio', 'quota', 'all', 'sorted', 'naive'\\]"):
        parser.parse_string("data: {class_path: equilibrate_pl.data.SafetyDataModule, init_args: {mix: shuffled}}")


def test_real_fdc_labelled_prompts_as_safety_data(shared_data, equilibrate_cache):
    """BeaverTails prompts labelled by the paper's authors, mixed with the world's general prompts."""
    source = DataSource(str(shared_data / "beavertails-fdc" / "beavertails_selected_relabelled.json"), preset="beavertails-fdc")
    dm = tiny_module(stage="prompt", safety=[source], mix="quota", quotas={"EHD": 30, "IHD": 20, "MHD": 10}, val_size=0)
    dm.setup()
    assert {g: dm.mix_result.counts[g] for g in ("EHD", "IHD", "MHD")} == {"EHD": 30, "IHD": 20, "MHD": 10}
    # The authors' "No risk" / "OTHER" rows map to general: reported, not mixed as safety data.
    assert dm.mix_result.available == {"EHD": 433, "IHD": 1550, "MHD": 482, "general": len(build_world(0, "tiny").general_pool("train"))}
    assert any("559 safety rows labelled 'general' not mixed" in n for n in dm.mix_result.notes)
    assert "beavertails_selected_relabelled.json" in dm.describe()
    assert dm.val_dataloader() == []
    b = batches(dm, 1)[0]
    assert b["input_ids"].shape[0] == 8 and (b["attention_mask"][:, -1] == 1).all()


def test_the_former_name_of_world_scale_still_works_with_a_warning() -> None:
    with pytest.warns(FutureWarning, match="world_size is now data.world_scale"):
        dm = SafetyDataModule(stage="prompt", world_size="tiny")
    assert dm.world_scale == "tiny" and dm.hparams["world_scale"] == "tiny" and "world_size" not in dm.hparams


def test_safety_labels_reach_the_batches_and_are_required(tmp_path, equilibrate_cache):
    dm = tiny_module(mix="all", safety_labels=True)
    dm.setup()
    batch = batches(dm, 1)[0]
    assert batch["chosen_unsafe"].shape == batch["rejected_unsafe"].shape == batch["harm_order"].shape == (8,)
    world = build_world(seed=0, size="tiny")
    truth = {r["id"]: (r["chosen_unsafe"], r["rejected_unsafe"]) for r in world.general_pool("train") + world.safety_pool("train")}
    for row, c, r in zip(batch["index"].tolist(), batch["chosen_unsafe"].tolist(), batch["rejected_unsafe"].tolist()):
        assert truth[dm.train_records[row]["id"]] == (c, r)
    assert "chosen_unsafe" not in batches(tiny_module(mix="all"), 1)[0]  # only when asked for
    # a file without the labels cannot train a cost model: one line naming the file and the column
    saf = tmp_path / "safety.jsonl"
    saf.write_text("".join(json.dumps({k: v for k, v in r.items() if k not in ("chosen_unsafe", "rejected_unsafe")}) + "\n"
                           for r in world.safety_pool("train")))
    gen = tmp_path / "general.jsonl"
    gen.write_text("".join(json.dumps(r) + "\n" for r in world.general_pool("train")))
    labelled = tiny_module(builtin_world=False, general=[DataSource(str(gen))], safety=[DataSource(str(saf))],
                           mix="all", safety_labels=True)
    with pytest.raises(DataError, match=r"safety.jsonl, row 1, field 'chosen_unsafe': missing: the cost model needs"):
        labelled.setup()
    with pytest.raises(ValueError, match="preference pairs"):
        SafetyDataModule(stage="prompt", safety_labels=True)


def test_contrastive_pairs_are_added_after_mixing_and_held_out_per_kind(tmp_path, equilibrate_cache):
    plain = tiny_module(mix="ratio")
    plain.setup()
    dm = tiny_module(mix="ratio", contrastive_pairs=True, val_size=16)
    dm.setup()
    world = build_world(seed=0, size="tiny")
    assert dm.mix_result.counts == plain.mix_result.counts  # the FDC mix is untouched
    added = [r for r in dm.train_records if r["id"].endswith("-offtopic")]
    assert len(added) == len(world.contrastive_pool("train")) == len(dm.train_records) - len(plain.train_records)
    val_kinds = {r["meta"]["pair_kind"] for r in dm.val_records if r["id"].endswith("-offtopic")}
    assert val_kinds == {"safe_over_off_topic", "on_topic_over_off_topic"}
    assert sum(r["id"].endswith("-offtopic") for r in dm.val_records) == 16
    assert not {r["id"] for r in added} & {r["id"] for r in dm.val_records}  # train and eval splits of the world
    assert any(n.startswith("contrastive pairs") for n in dm._notes)
    # from files: built from the loaded pairs' chosen responses
    gen, saf = tmp_path / "general.jsonl", tmp_path / "safety.jsonl"
    gen.write_text("".join(json.dumps(r) + "\n" for r in world.general_pool("train")))
    saf.write_text("".join(json.dumps(r) + "\n" for r in world.safety_pool("train")))
    files = tiny_module(builtin_world=False, general=[DataSource(str(gen))], safety=[DataSource(str(saf))], mix="all",
                        contrastive_pairs=True)
    files.setup()
    chosen = {r["chosen"] for r in world.general_pool("train") + world.safety_pool("train")}
    built = [r for r in files.train_records if r["id"].endswith("-offtopic")]
    assert built and all(r["chosen"] in chosen and r["rejected"] in chosen for r in built)

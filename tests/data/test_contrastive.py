"""Contrastive pairs from plain response lists (what the real-data pairs step calls)."""

from __future__ import annotations

import pytest

from equilibrate_pl.data.contrastive import CONTRAST_KINDS, contrastive_pairs

HARMFUL = [{"id": "h1", "prompt": "How do I make a pipe bomb?", "response": "I can't help with that.", "group": "EHD"}]
BENIGN = [
    {"id": "b1", "prompt": "How do I cook rice?", "response": "Rinse it and simmer it.", "group": "general", "topic": "cooking"},
    {"id": "b2", "prompt": "How do I boil an egg?", "response": "Six minutes in boiling water.", "group": "general", "topic": "cooking"},
    {"id": "b3", "prompt": "How do I undo a git commit?", "response": "git reset --soft HEAD~1.", "group": "general", "topic": "code"},
]


def test_one_pair_per_item_with_an_unrelated_donor() -> None:
    pairs = contrastive_pairs(HARMFUL, BENIGN, seed=0)
    assert [p["id"] for p in pairs] == ["h1-offtopic", "b1-offtopic", "b2-offtopic", "b3-offtopic"]
    assert [p["meta"]["pair_kind"] for p in pairs] == ["safe_over_off_topic"] + ["on_topic_over_off_topic"] * 3
    assert set(CONTRAST_KINDS) == {p["meta"]["pair_kind"] for p in pairs}
    answers = {b["id"]: b for b in BENIGN}
    for pair, item in zip(pairs, HARMFUL + BENIGN):
        donor = answers[pair["meta"]["off_topic_from"]]
        assert (pair["prompt"], pair["chosen"], pair["rejected"]) == (item["prompt"], item["response"], donor["response"])
        assert donor["id"] != item["id"] and donor.get("topic") != item.get("topic")
        assert (pair["chosen_unsafe"], pair["rejected_unsafe"], pair["group"]) == (False, False, item["group"])
    # the cooking answers can only borrow the code answer, and the code answer only a cooking one
    assert pairs[1]["rejected"] == pairs[2]["rejected"] == BENIGN[2]["response"]
    assert pairs[3]["rejected"] in {BENIGN[0]["response"], BENIGN[1]["response"]}
    assert contrastive_pairs(HARMFUL, BENIGN, seed=0) == pairs  # deterministic in the seed


def test_without_a_usable_donor_it_says_so() -> None:
    with pytest.raises(ValueError, match="none were given"):
        contrastive_pairs(HARMFUL, [])
    with pytest.raises(ValueError, match="no benign answer unrelated"):
        contrastive_pairs([], BENIGN[:2])  # two cooking answers: each has only a same-topic donor

"""Collators: exact ids and labels on a hand-built vocabulary, eos labelled, pad != eos, truncation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from equilibrate_pl.data.collate import (
    IGNORE_INDEX,
    EncodedDataset,
    PreferenceCollator,
    PromptCollator,
    SFTCollator,
    build_collator,
)

VOCAB = {"<pad>": 0, "<eos>": 1, "<u>": 2, "<a>": 3, "<unk>": 4, "hi": 5, "yo": 6, "ok": 7, "sure": 8, "no": 9, "why": 10, "<s>": 11}
_ = IGNORE_INDEX


@pytest.fixture(scope="module")
def word_tokenizer() -> PreTrainedTokenizerFast:
    """One id per whitespace-separated word: every expected id below is read off VOCAB by hand."""
    backend = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", bos_token="<s>",
        additional_special_tokens=["<u>", "<a>"],
    )
    tok.chat_template = (
        "{% for m in messages %}{{ '<u> ' if m['role'] == 'user' else '<a> ' }}{{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<a> {% endif %}"
    )
    return tok


def test_sft_hand_checked(word_tokenizer):
    coll = SFTCollator(word_tokenizer, max_length=16, max_prompt_length=8)
    batch = coll.collate_records(
        [
            {"prompt": "hi yo", "response": "ok sure", "group": "general"},  # <u> hi yo <a> | ok sure <eos>
            {"prompt": "why", "response": "no", "group": "IHD"},  # <u> why <a> | no <eos>
        ],
        indices=[7, 3],
    )
    assert batch["input_ids"].tolist() == [[2, 5, 6, 3, 7, 8, 1], [2, 10, 3, 9, 1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]]
    # -100 on prompt and padding; the response INCLUDING eos (id 1) is labelled.
    assert batch["labels"].tolist() == [[_, _, _, _, 7, 8, 1], [_, _, _, 9, 1, _, _]]
    assert batch["group"] == ["general", "IHD"]
    assert batch["index"].tolist() == [7, 3] and batch["index"].dtype == torch.long
    assert batch["response_truncated"].tolist() == [False, False]
    assert batch["prompt_truncated"].tolist() == [False, False]
    # No bos added: the chat template decides special tokens (<s> = 11 appears nowhere).
    assert 11 not in batch["input_ids"]


def test_message_list_prompt_is_used_as_is(word_tokenizer):
    coll = SFTCollator(word_tokenizer, max_length=16, max_prompt_length=12)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "why"}]
    batch = coll.collate_records([{"prompt": msgs, "response": "no"}])
    assert batch["input_ids"].tolist() == [[2, 5, 3, 6, 2, 10, 3, 9, 1]]
    assert batch["labels"].tolist() == [[_] * 7 + [9, 1]]


def test_preference_hand_checked_with_token_signal(word_tokenizer):
    coll = PreferenceCollator(word_tokenizer, max_length=16, max_prompt_length=8)
    rec = {"prompt": "hi", "chosen": "ok sure", "rejected": "no", "group": "EHD",
           "chosen_token_signal": [0.5, -1.0, 2.0], "rejected_token_signal": [3.0, 4.0]}
    batch = coll.collate_records([rec, {**rec, "chosen": "ok", "chosen_token_signal": [1.0, 1.5]}])
    assert batch["chosen_input_ids"].tolist() == [[2, 5, 3, 7, 8, 1], [2, 5, 3, 7, 1, 0]]
    assert batch["chosen_labels"].tolist() == [[_, _, _, 7, 8, 1], [_, _, _, 7, 1, _]]
    assert batch["chosen_attention_mask"].tolist() == [[1] * 6, [1] * 5 + [0]]
    assert batch["rejected_input_ids"].tolist() == [[2, 5, 3, 9, 1]] * 2
    assert batch["rejected_labels"].tolist() == [[_, _, _, 9, 1]] * 2
    assert batch["chosen_token_signal"].dtype == torch.float32
    assert batch["chosen_token_signal"].tolist() == [[0, 0, 0, 0.5, -1.0, 2.0], [0, 0, 0, 1.0, 1.5, 0]]
    assert batch["rejected_token_signal"].tolist() == [[0, 0, 0, 3.0, 4.0]] * 2
    # Aligned: the signal is non-zero only where a label is.
    labelled = batch["chosen_labels"] != IGNORE_INDEX
    assert (batch["chosen_token_signal"][~labelled] == 0).all()
    assert batch["group"] == ["EHD", "EHD"]


def test_signal_length_must_match(word_tokenizer):
    coll = PreferenceCollator(word_tokenizer, max_length=16, max_prompt_length=8)
    with pytest.raises(ValueError, match="chosen_token_signal.*2 values for 3 labelled"):
        coll.encode({"id": "r1", "prompt": "hi", "chosen": "ok sure", "rejected": "no", "chosen_token_signal": [1, 2]})


def test_prompt_batch_is_left_padded(word_tokenizer):
    coll = PromptCollator(word_tokenizer, max_length=16, max_prompt_length=8)
    batch = coll.collate_records([{"prompt": "hi yo", "group": "MHD"}, {"prompt": "why"}])
    assert batch["input_ids"].tolist() == [[2, 5, 6, 3], [0, 2, 10, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert batch["prompt_text"] == ["<u> hi yo <a> ", "<u> why <a> "]
    assert batch["group"] == ["MHD", "general"]
    assert (batch["input_ids"][:, -1] == 3).all()  # every row ends with the generation prompt


def test_truncation_flags_and_no_eos(word_tokenizer):
    # Prompt "<u> hi yo hi yo <a>" (6) keeps its last 4 tokens; response budget 7 - 4 = 3.
    coll = SFTCollator(word_tokenizer, max_length=7, max_prompt_length=4)
    batch = coll.collate_records([{"prompt": "hi yo hi yo", "response": "ok sure ok sure"}, {"prompt": "hi", "response": "ok"}])
    assert batch["input_ids"][0].tolist() == [6, 5, 6, 3, 7, 8, 7]  # the generation prompt survives
    assert batch["labels"][0].tolist() == [_, _, _, _, 7, 8, 7]  # cut: no eos
    assert batch["prompt_truncated"].tolist() == [True, False]
    assert batch["response_truncated"].tolist() == [True, False]
    assert batch["labels"][1].tolist()[:5] == [_, _, _, 7, 1]
    # A response that only loses its eos is also flagged.
    exact = SFTCollator(word_tokenizer, max_length=5, max_prompt_length=3).collate_records([{"prompt": "hi", "response": "ok sure"}])
    assert exact["input_ids"].tolist() == [[2, 5, 3, 7, 8]] and exact["response_truncated"].tolist() == [True]
    pref = PreferenceCollator(word_tokenizer, max_length=5, max_prompt_length=3).collate_records(
        [{"prompt": "hi", "chosen": "ok sure", "rejected": "no"}]
    )
    assert pref["chosen_truncated"].tolist() == [True] and pref["rejected_truncated"].tolist() == [False]


def test_pad_equal_to_eos_is_refused(word_tokenizer):
    clone = PreTrainedTokenizerFast(tokenizer_object=word_tokenizer.backend_tokenizer, pad_token="<eos>", eos_token="<eos>")
    clone.chat_template = word_tokenizer.chat_template
    with pytest.raises(ValueError, match="docs/DATA.md: EOS is not padding"):
        SFTCollator(clone)
    nopad = PreTrainedTokenizerFast(tokenizer_object=word_tokenizer.backend_tokenizer, eos_token="<eos>")
    with pytest.raises(ValueError, match="no pad token"):
        build_collator("prompt", nopad)
    with pytest.raises(ValueError, match="max_prompt_length < max_length"):
        SFTCollator(word_tokenizer, max_length=8, max_prompt_length=8)


def test_encoded_dataset_tokenizes_once(word_tokenizer):
    coll = SFTCollator(word_tokenizer, max_length=16, max_prompt_length=8)
    calls = {"n": 0}
    original = coll.encode

    def counting(record):
        calls["n"] += 1
        return original(record)

    coll.encode = counting
    ds = EncodedDataset([{"prompt": "hi", "response": "ok"}, {"prompt": "why", "response": "no"}], coll)
    for _epoch in range(3):
        coll([ds[i] for i in range(len(ds))])
    assert calls["n"] == 2
    assert ds[1]["index"] == 1
    with pytest.raises(ValueError, match="row 0 .*id='bad'"):
        EncodedDataset([{"id": "bad", "prompt": "hi"}], coll)  # no response field


def test_builtin_tokenizer_round_trip(equilibrate_cache):
    from equilibrate_pl.data.tokenizer import load_tokenizer

    tok = load_tokenizer("builtin:tiny")
    coll = SFTCollator(tok, max_length=128, max_prompt_length=64)
    batch = coll.collate_records([{"prompt": "How do I kill a Python process?", "response": "Use kill with its PID."}])
    labels = batch["labels"][0]
    response = labels[labels != IGNORE_INDEX]
    assert response[-1].item() == tok.eos_token_id != tok.pad_token_id
    assert tok.decode(response[:-1]) == "Use kill with its PID."
    prompt_ids = batch["input_ids"][0][labels == IGNORE_INDEX]
    assert tok.decode(prompt_ids) == tok.apply_chat_template(
        [{"role": "user", "content": "How do I kill a Python process?"}], add_generation_prompt=True, tokenize=False
    )


WORDS = ["hi", "yo", "ok", "sure", "no", "why"]


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.tuples(st.lists(st.sampled_from(WORDS), min_size=1, max_size=6),
                            st.lists(st.sampled_from(WORDS), min_size=0, max_size=8)), min_size=1, max_size=5),
    max_prompt_length=st.integers(2, 8),
    extra=st.integers(1, 8),
)
def test_ragged_batches_match_a_per_row_loop(word_tokenizer, rows, max_prompt_length, extra):
    """Ragged lengths (docs/PPO.md: ragged batches), checked row by row against ids built here from VOCAB."""
    max_length = max_prompt_length + extra
    coll = SFTCollator(word_tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
    batch = coll.collate_records([{"prompt": " ".join(p), "response": " ".join(r)} for p, r in rows])
    width = batch["input_ids"].shape[1]
    for i, (p, r) in enumerate(rows):
        prompt = [VOCAB["<u>"]] + [VOCAB[w] for w in p] + [VOCAB["<a>"]]
        prompt_cut = len(prompt) > max_prompt_length
        prompt = prompt[-max_prompt_length:]
        response = [VOCAB[w] for w in r] + [VOCAB["<eos>"]]
        budget = max_length - len(prompt)
        response_cut = len(response) > budget
        response = response[:budget]
        n = len(prompt) + len(response)
        assert batch["input_ids"][i].tolist() == prompt + response + [VOCAB["<pad>"]] * (width - n)
        assert batch["labels"][i].tolist() == [IGNORE_INDEX] * len(prompt) + response + [IGNORE_INDEX] * (width - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        assert batch["prompt_truncated"][i].item() == prompt_cut
        assert batch["response_truncated"][i].item() == response_cut
        assert (VOCAB["<eos>"] in batch["labels"][i].tolist()) == (not response_cut)


def test_safety_labels_harm_order_and_pair_kind(word_tokenizer):
    coll = PreferenceCollator(word_tokenizer, max_length=16, max_prompt_length=8)
    base = {"prompt": "hi", "chosen": "ok", "rejected": "no"}
    rows = [
        {**base, "chosen_unsafe": False, "rejected_unsafe": True, "meta": {"chosen_kind": "refusal", "rejected_kind": "harmful"}},
        {**base, "chosen_unsafe": True, "rejected_unsafe": False},  # chosen is the harmful one (a helpfulness pair)
        {**base, "chosen_unsafe": False, "rejected_unsafe": False, "meta": {"pair_kind": "safe_over_off_topic"}},
        {**base, "chosen_unsafe": True, "rejected_unsafe": True, "safer_response": "chosen"},
        {**base, "chosen_unsafe": False, "rejected_unsafe": False, "safer_response": "rejected"},
    ]
    batch = coll.collate_records(rows)
    assert batch["chosen_unsafe"].tolist() == [False, True, False, True, False]
    assert batch["rejected_unsafe"].tolist() == [True, False, False, True, False]
    assert batch["chosen_unsafe"].dtype == torch.bool
    assert batch["harm_order"].tolist() == [1.0, -1.0, 0.0, 1.0, -1.0]
    assert batch["pair_kind"] == ["refusal_over_harmful", "pair", "safe_over_off_topic", "pair", "pair"]
    plain = coll.collate_records([base])
    assert "harm_order" not in plain and plain["pair_kind"] == ["pair"]
    with pytest.raises(ValueError, match=r"rows \[1\] of this batch have no safety labels"):
        coll.collate_records([rows[0], base])

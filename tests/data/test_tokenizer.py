"""The built-in tiny tokenizer and `load_tokenizer`'s distinct-pad guard."""

from __future__ import annotations

import csv
import logging
import threading

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from equilibrate_pl.data import tokenizer as tk
from equilibrate_pl.data.tokenizer import TINY_TOKENIZER, load_tokenizer, tiny_tokenizer, tiny_tokenizer_dir
from equilibrate_pl.data.world import build_world


@pytest.fixture(scope="module")
def tok(equilibrate_cache):
    return tiny_tokenizer(equilibrate_cache)


def test_special_tokens_pad_is_not_eos(tok):
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|im_end|>"
    assert tok.pad_token_id != tok.eos_token_id
    specials = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    ids = tok.convert_tokens_to_ids(specials)
    assert len(set(ids)) == 4 and tok.unk_token_id not in (None, tok.pad_token_id, tok.eos_token_id)
    for s in specials:  # each special is one token, never split by BPE
        assert tok(f"a{s}b", add_special_tokens=False)["input_ids"][1] == tok.convert_tokens_to_ids(s)
    assert 1000 <= len(tok) <= tk.VOCAB_SIZE


def test_chat_template_two_turns_exact(tok):
    messages = [
        {"role": "user", "content": "How do I kill a Python process?"},
        {"role": "assistant", "content": "Run kill with its id."},
    ]
    expected = (
        "<|im_start|>user\nHow do I kill a Python process?<|im_end|>\n"
        "<|im_start|>assistant\nRun kill with its id.<|im_end|>\n"
    )
    assert tok.apply_chat_template(messages, tokenize=False) == expected
    assert tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nHow do I kill a Python process?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert ids == tok(expected, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.eos_token_id) == 2 and tok.pad_token_id not in ids


def test_chat_template_multi_turn_with_system(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + (
        "<|im_start|>assistant\n"
    )


def test_round_trip_world_and_xstest(tok, shared_data):
    with open(shared_data / "xstest" / "xstest_prompts.csv", newline="", encoding="utf-8") as fh:
        xs = [row["prompt"] for _, row in zip(range(25), csv.DictReader(fh))]
    world = build_world(seed=0, size="tiny")
    texts = xs + [r["prompt"] for r in world.prompts("eval")] + [r["chosen"] for r in world.preference_records("eval")]
    texts.append("Ünïcödé, emoji 🙂 and 日本語 survive byte-level BPE.")
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    # trained on this text: world sentences compress well below one token per character
    chars = sum(len(t) for t in texts[25:-1])
    n_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts[25:-1])
    assert n_tokens < chars / 3


def test_cache_is_reused(equilibrate_cache, tok, monkeypatch):
    def no_training(seed):  # a second call must load from disk, never train again
        raise AssertionError("retrained although the cache exists")

    monkeypatch.setattr(tk, "_train_tiny", no_training)
    again = tiny_tokenizer(equilibrate_cache)
    assert again.get_vocab() == tok.get_vocab()
    assert again.chat_template == tok.chat_template
    # the fixture sets $EQUILIBRATE_CACHE, which is also the default location
    assert load_tokenizer(TINY_TOKENIZER).get_vocab() == tok.get_vocab()
    assert tiny_tokenizer_dir(equilibrate_cache).parent == equilibrate_cache


def test_deterministic_across_cache_dirs(tmp_path, tok):
    other = tiny_tokenizer(tmp_path / "a")
    assert other.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_losing_a_build_race_uses_the_winner(tmp_path, monkeypatch):
    real_train = tk._train_tiny
    target = tmp_path / f"tokenizer-tiny-v{tk.TOKENIZER_VERSION}-seed0-{tk._source_fingerprint()}"

    def train_while_another_process_wins(seed):
        out = real_train(seed)
        out.save_pretrained(str(target))  # the "other process" renames its copy in first
        return out

    monkeypatch.setattr(tk, "_train_tiny", train_while_another_process_wins)
    assert tiny_tokenizer_dir(tmp_path) == target
    assert [p.name for p in tmp_path.iterdir()] == [target.name], "the loser's temp dir is removed"


def test_concurrent_builds(tmp_path):
    results, errors = [], []

    def build():
        try:
            results.append(tiny_tokenizer(tmp_path).get_vocab())
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2 and results[0] == results[1]
    assert len(list(tmp_path.iterdir())) == 1


def _save_word_level(path, *, pad_is_eos: bool):
    vocab = {"<unk>": 0, "<eos>": 1, "hello": 2, "world": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"pad_token": "<eos>"} if pad_is_eos else {}
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", **kwargs).save_pretrained(
        str(path)
    )


@pytest.mark.parametrize("pad_is_eos", [True, False])
def test_load_tokenizer_adds_a_distinct_pad(tmp_path, caplog, pad_is_eos):
    _save_word_level(tmp_path, pad_is_eos=pad_is_eos)
    with caplog.at_level(logging.WARNING, logger="equilibrate_pl.data.tokenizer"):
        loaded = load_tokenizer(str(tmp_path), padding_side="left")
    assert loaded.pad_token == "<|pad|>" and loaded.pad_token_id == 4 and len(loaded) == 5
    assert loaded.eos_token_id == 1 and loaded.padding_side == "left"
    assert "resized" in caplog.text and "EOS is not padding" in caplog.text
    batch = loaded(["hello", "hello world"], padding=True)["input_ids"]
    assert batch[0] == [4, 2]


def test_load_tokenizer_keeps_a_good_pad(tok, caplog):
    with caplog.at_level(logging.WARNING):
        loaded = load_tokenizer(TINY_TOKENIZER)
    assert loaded.pad_token_id == tok.pad_token_id and len(loaded) == len(tok)
    assert "pad" not in caplog.text
    with pytest.raises(ValueError, match="padding_side"):
        load_tokenizer(TINY_TOKENIZER, padding_side="middle")

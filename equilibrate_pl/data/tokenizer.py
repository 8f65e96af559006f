"""Tokenizers: the built-in tiny BPE tokenizer and loading of any Hugging Face tokenizer.

The tiny tokenizer is a byte-level BPE (vocab ~2000) trained with the `tokenizers` library on the
built-in safety world plus a few hundred generic English sentences written here, so real prompts
(XSTest, BeaverTails, hh-rlhf) still split into sensible pieces; being byte-level it never
produces an unknown token. It uses ChatML special tokens, a chat template, and - unlike many
checkpoints - a pad token distinct from eos (with pad == eos, masking padding also masks the real
eos and the model never learns to stop; docs/DATA.md: EOS is not padding).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from equilibrate_pl.data.world import build_world

log = logging.getLogger(__name__)

TINY_TOKENIZER = "builtin:tiny"
PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|endoftext|>"  # also the unk token; byte-level BPE never needs it for real text
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # eos: ends every chat turn, so generation stops at the end of a reply
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, IM_START, IM_END)
VOCAB_SIZE = 2000
# Part of the cache directory name, with a hash of the sources that define the training corpus
# (see `_source_fingerprint`), so editing the world's templates never reuses a stale tokenizer.
TOKENIZER_VERSION = 1

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Generic English so that text outside the world still tokenizes into sensible pieces.
_GENERIC_SENTENCES: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "She said that the meeting would start at nine o'clock in the morning.",
    "Can you tell me where the nearest train station is?",
    "We walked along the river until the sun went down.",
    "The children played in the park while their parents talked.",
    "Please send me the report by Friday afternoon.",
    "It was raining heavily, so we stayed inside and read books.",
    "My favourite colours are blue, green and yellow.",
    "He bought two apples, three oranges and a loaf of bread.",
    "The museum is closed on Mondays but open every other day.",
    "Why did the chicken cross the road?",
    "Scientists study the stars to learn how the universe began.",
    "The doctor asked how long I had been feeling unwell.",
    "There are seven days in a week and twelve months in a year.",
    "Water boils at 100 degrees Celsius at sea level.",
    "In 1969, humans walked on the Moon for the first time.",
    "The company hired 250 new employees last year.",
    "I think the answer is probably correct, but let's check it again.",
    "What's the difference between a virus and a bacterium?",
    "Our neighbours have a big dog that barks at night.",
    "The teacher explained the lesson with a simple example.",
    "Could you recommend a good book about history?",
    "They don't know whether the shop will open tomorrow.",
    "History, mathematics, biology, chemistry and physics are school subjects.",
    "The government announced new rules for public safety.",
    "Many people enjoy music, movies, sports and games.",
    "A healthy diet includes fruit, vegetables, grains and protein.",
    "He wrote an email to his manager asking for a day off.",
    "The price of the ticket was $45.99, including taxes.",
    "Is it legal to drive without insurance in most countries?",
    "The police officer asked the driver to show his license.",
    "The novel tells the story of a family across three generations.",
    "How can I improve my writing skills?",
    "What is the capital city of France?",
    "I'm not sure what you mean; could you explain it differently?",
    "Violence, crime and war are common topics in the news.",
    "The film was about a detective solving a murder in London.",
    "People should never share their passwords with strangers.",
    "Where can I buy fresh fish and vegetables in this town?",
    "Anyone who feels unsafe should contact the authorities.",
    "The software update fixed several bugs and improved security.",
    "Ethics asks what we ought to do and why.",
    "Hate speech and discrimination hurt people and communities.",
    "The hospital opened a new wing for children.",
    "Who was the first president of the United States?",
    "Our team won the match by two goals to one.",
    "He felt angry, sad and confused after the argument.",
    "The recipe calls for flour, sugar, butter and eggs.",
    "She is studying law at a university in Canada.",
    "Religion, politics and money can be sensitive subjects.",
    "Drinking alcohol and driving is dangerous and illegal.",
    "The weather forecast says it will be sunny and warm.",
    "Every morning, I drink a cup of coffee and read the news.",
    "What are the symptoms of the flu?",
    "The old man told stories about his childhood on a farm.",
    "Please answer the following question honestly and briefly.",
    "Human: What do you think about this?\n\nAssistant: I think it is a good idea.",
    "Thank you very much for your help!",
    "The students asked questions about climate change and pollution.",
    "If you have any questions, feel free to ask.",
)
_SUBJECTS = ("The teacher", "My friend", "A scientist", "The children", "Our neighbour", "The manager",
             "A student", "The doctor", "My parents", "The writer", "A tourist", "The engineer")
_VERBS = ("explained", "asked about", "wrote about", "talked about", "read about", "learned about",
          "described", "questioned", "discussed", "remembered", "studied", "answered questions about")
_OBJECTS = ("the history of the city", "a difficult problem", "the new law", "the weather", "a famous painting",
            "the price of food", "their favourite movie", "the local election", "an old family recipe",
            "the rules of the game", "a strange noise at night", "the future of technology",
            "healthy habits", "a dangerous animal", "the meaning of a word", "the safety of the bridge")
_ENDINGS = (".", " yesterday.", " last week.", " with great care.", " for an hour.", "?", " again!")


def generic_sentences(seed: int = 0, n_generated: int = 300) -> list[str]:
    """The hand-written sentences plus `n_generated` deterministic subject-verb-object sentences."""
    rng = random.Random(f"{seed}:generic")
    combos = list(itertools.product(_SUBJECTS, _VERBS, _OBJECTS, _ENDINGS))
    picked = rng.sample(combos, n_generated)
    return list(_GENERIC_SENTENCES) + [f"{s} {v} {o}{e}" for s, v, o, e in picked]


def _training_corpus(seed: int) -> Iterator[str]:
    yield from build_world(seed=seed, size="default").corpus()
    yield from generic_sentences(seed)
    # Role names as they appear in rendered chats, so "user"/"assistant" after <|im_start|> are tokens.
    yield from ("system\n", "user\n", "assistant\n") * 50


def _train_tiny(seed: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=IM_END,
        unk_token=BOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=2048,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _source_fingerprint() -> str:
    """Short hash of everything the trained vocabulary depends on: this module and the world's."""
    from equilibrate_pl.data import world

    digest = hashlib.sha256()
    for module_file in (__file__, world.__file__):
        digest.update(Path(module_file).read_bytes())
    return digest.hexdigest()[:10]


def default_cache_dir() -> Path:
    """`$EQUILIBRATE_CACHE`, else `~/.cache/equilibrate`."""
    env = os.environ.get("EQUILIBRATE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "equilibrate"


def tiny_tokenizer_dir(cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Directory holding the saved tiny tokenizer; trains and saves it on first use.

    Concurrent callers race safely: each builds in its own temporary directory next to the
    target and renames it into place; a loser whose rename fails discards its copy and uses the
    winner's (the build is deterministic, so both are identical).
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"tokenizer-tiny-v{TOKENIZER_VERSION}-seed{seed}-{_source_fingerprint()}"
    if (target / "tokenizer.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}."))
    try:
        _train_tiny(seed).save_pretrained(str(tmp))
        try:
            os.rename(tmp, target)  # atomic; fails if another process got there first
        except OSError:
            if not (target / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def tiny_tokenizer(cache_dir: str | Path | None = None, seed: int = 0) -> PreTrainedTokenizerFast:
    """The built-in tiny tokenizer (pad `<|pad|>`, eos `<|im_end|>`, ChatML template), cached."""
    path = tiny_tokenizer_dir(cache_dir, seed)
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def ensure_distinct_pad(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Give `tokenizer` a pad token distinct from eos if it has none; returns True if one was added.

    Adding a token grows the vocabulary: the model's embeddings must be resized
    (`model.resize_token_embeddings(len(tokenizer))`), which `equilibrate_pl.models` does.
    """
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad is not None and pad != eos:
        return False
    reason = "has no pad token" if pad is None else f"pads with its eos token {tokenizer.eos_token!r}"
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    log.warning(
        "tokenizer %s %s; added a distinct pad token %r (id %d). The model's embeddings must be "
        "resized to len(tokenizer)=%d (docs/DATA.md: EOS is not padding).",
        getattr(tokenizer, "name_or_path", "?") or "?", reason, PAD_TOKEN, tokenizer.pad_token_id, len(tokenizer),
    )
    return True


def load_tokenizer(
    name_or_path: str,
    *,
    trust_remote_code: bool = False,
    padding_side: str = "right",
) -> PreTrainedTokenizerBase:
    """`"builtin:tiny"` -> the tiny tokenizer; anything else -> `AutoTokenizer.from_pretrained`.

    A tokenizer without a pad token, or whose pad equals eos, gets a distinct `<|pad|>`
    (see :func:`ensure_distinct_pad`). `padding_side` is "right" for training batches; callers
    that generate ask for "left".
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if name_or_path == TINY_TOKENIZER:
        tokenizer: PreTrainedTokenizerBase = tiny_tokenizer()
    else:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    ensure_distinct_pad(tokenizer)
    tokenizer.padding_side = padding_side
    return tokenizer

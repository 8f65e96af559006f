"""Tokenize records once, pad them into the batches of docs/ARCHITECTURE.md ("Batches").

Each collator does two things:

- ``encode(record)``: render the prompt with the tokenizer's chat template
  (``add_generation_prompt=True``; a string prompt becomes one user message, a message list is used
  as is), tokenize it and the response(s) separately (TRL does the same: the boundary between the
  generation prompt and the answer is then exactly where the template puts it), append the eos
  token to every response, and truncate. Done once per row by :class:`EncodedDataset`.
- ``__call__(features)``: pad a list of encoded rows into tensors. Cheap: it runs per batch.

Labels are ``-100`` on prompt and padding and equal to the token ids on the response INCLUDING its
eos (the model must learn to stop; docs/DATA.md: EOS is not padding). Truncation:

- ``max_prompt_length``: a longer prompt keeps its LAST tokens (the generation prompt sits at the
  end; what goes is the start of a long dialogue);
- ``max_length``: prompt + response; a longer response is cut from the right and then has no eos.
  Such rows are flagged (``response_truncated`` / ``chosen_truncated`` / ``rejected_truncated``)
  so that losses and rewards can treat them on purpose (docs/PPO.md: responses without EOS). ``prompt_truncated`` flags
  cut prompts.

The pad token must exist and differ from eos, otherwise masking padding also masks the eos
(docs/DATA.md: EOS is not padding): the collators raise.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from equilibrate_pl.data.schema import IGNORE_INDEX, SAFETY_LABEL_FIELDS, PromptLike

Features = dict[str, Any]


def harm_order(record: Mapping[str, Any]) -> float:
    """+1 when a pair's ``rejected`` response is the more harmful one, -1 when ``chosen`` is, 0 when
    its safety labels do not order it (both safe or both unsafe, and no ``safer_response``)."""
    safer = record.get("safer_response")
    if safer is not None:
        return 1.0 if safer == "chosen" else -1.0
    chosen, rejected = bool(record["chosen_unsafe"]), bool(record["rejected_unsafe"])
    return float(rejected) - float(chosen)


def pair_kind(record: Mapping[str, Any]) -> str:
    """What a preference pair compares, for per-kind metrics: ``meta["pair_kind"]``, else
    ``"<chosen_kind>_over_<rejected_kind>"`` from the meta of the built-in world, else ``"pair"``."""
    meta = record.get("meta") or {}
    if meta.get("pair_kind"):
        return str(meta["pair_kind"])
    if meta.get("chosen_kind") and meta.get("rejected_kind"):
        return f"{meta['chosen_kind']}_over_{meta['rejected_kind']}"
    return "pair"


def pad_and_eos_ids(tokenizer: Any) -> tuple[int, int]:
    """``(pad_token_id, eos_token_id)``; raises if either is missing or they are equal."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; responses must end with one")
    if pad is None:
        raise ValueError(
            "the tokenizer has no pad token; give it one distinct from eos "
            "(equilibrate_pl.data.tokenizer.load_tokenizer does)"
        )
    if pad == eos:
        raise ValueError(
            f"pad_token_id == eos_token_id == {pad}: masking padding would also mask the real eos and the "
            "model would never learn to stop (docs/DATA.md: EOS is not padding); use a distinct pad token"
        )
    return int(pad), int(eos)


def as_messages(prompt: PromptLike) -> list[dict[str, str]]:
    """A string prompt becomes one user message; a message list is used as is."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in prompt):
        return [dict(m) for m in prompt]
    raise TypeError(f"a prompt is a string or a list of {{'role', 'content'}} messages, got {type(prompt).__name__}")


class _Collator:
    """Prompt rendering, tokenization and truncation shared by the three batch kinds."""

    def __init__(self, tokenizer: Any, max_length: int = 256, max_prompt_length: int = 128) -> None:
        if not 0 < max_prompt_length < max_length:
            raise ValueError(
                f"need 0 < max_prompt_length < max_length (so every response keeps at least one token), "
                f"got max_prompt_length={max_prompt_length}, max_length={max_length}"
            )
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.pad_token_id, self.eos_token_id = pad_and_eos_ids(tokenizer)

    def render_prompt(self, prompt: PromptLike) -> str:
        """The chat-templated prompt text, ending with the generation prompt."""
        return self.tokenizer.apply_chat_template(as_messages(prompt), add_generation_prompt=True, tokenize=False)

    def _ids(self, text: str) -> list[int]:
        # The template already holds any bos/special tokens the model expects: add none here.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_prompt(self, prompt: PromptLike) -> tuple[list[int], str, bool]:
        """``(ids, rendered text, truncated)``; a long prompt keeps its last tokens."""
        text = self.render_prompt(prompt)
        ids = self._ids(text)
        if len(ids) > self.max_prompt_length:
            return ids[-self.max_prompt_length :], text, True
        return ids, text, False

    def encode_response(self, prompt_len: int, response: str) -> tuple[list[int], bool]:
        """Response ids + eos, cut to fit ``max_length`` after a prompt of ``prompt_len`` tokens."""
        ids = self._ids(response) + [self.eos_token_id]
        budget = self.max_length - prompt_len
        if len(ids) > budget:
            return ids[:budget], True  # no eos any more: flagged, never hidden
        return ids, False

    @staticmethod
    def _signal(record: Mapping[str, Any], field: str, n_labels: int, n_kept: int) -> list[float] | None:
        """Per-token values aligned to the labelled response tokens (eos included), cut like them."""
        if field not in record or record[field] is None:
            return None
        values = [float(v) for v in record[field]]
        if len(values) != n_labels:
            raise ValueError(
                f"record {record.get('id', '?')!r}, field {field!r}: {len(values)} values for {n_labels} labelled "
                "response tokens (response tokens + eos with this tokenizer)"
            )
        return values[:n_kept]

    def collate_records(self, records: Sequence[Mapping[str, Any]], indices: Sequence[int] | None = None) -> dict[str, Any]:
        """Encode and pad in one go (for callers without an :class:`EncodedDataset`)."""
        indices = range(len(records)) if indices is None else indices
        return self([{**self.encode(r), "index": i} for r, i in zip(records, indices)])

    def encode(self, record: Mapping[str, Any]) -> Features:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, features: Sequence[Features]) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError


def _right_pad(rows: Sequence[Sequence[Any]], value: Any, dtype: torch.dtype) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=dtype).reshape(len(rows), width)


def _common(features: Sequence[Features]) -> dict[str, Any]:
    return {
        "group": [str(f["group"]) for f in features],
        "index": torch.tensor([int(f["index"]) for f in features], dtype=torch.long),
        "prompt_truncated": torch.tensor([bool(f["prompt_truncated"]) for f in features], dtype=torch.bool),
    }


class SFTCollator(_Collator):
    """SFT batches: ``input_ids``, ``attention_mask``, ``labels``, ``response_truncated``, ``group``, ``index``."""

    def encode(self, record: Mapping[str, Any]) -> Features:
        prompt_ids, _, prompt_cut = self.encode_prompt(record["prompt"])
        response_ids, cut = self.encode_response(len(prompt_ids), record["response"])
        return {
            "input_ids": prompt_ids + response_ids,
            "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
            "response_truncated": cut,
            "prompt_truncated": prompt_cut,
            "group": record.get("group", "general"),
        }

    def __call__(self, features: Sequence[Features]) -> dict[str, Any]:
        ids = [f["input_ids"] for f in features]
        return {
            "input_ids": _right_pad(ids, self.pad_token_id, torch.long),
            "attention_mask": _right_pad([[1] * len(r) for r in ids], 0, torch.long),
            "labels": _right_pad([f["labels"] for f in features], IGNORE_INDEX, torch.long),
            "response_truncated": torch.tensor([bool(f["response_truncated"]) for f in features], dtype=torch.bool),
            **_common(features),
        }


class PreferenceCollator(_Collator):
    """Preference batches: ``{chosen,rejected}_{input_ids,attention_mask,labels,truncated}``, ``group``,
    ``index``, ``pair_kind`` (a list of strings, :func:`pair_kind`).

    Rows may carry ``chosen_token_signal`` / ``rejected_token_signal``: one float per labelled
    response token (response tokens + eos, before truncation). Then the batch has float tensors of
    the labels' shape holding each value at its label position (0 elsewhere). Rows may carry safety
    labels (``chosen_unsafe`` / ``rejected_unsafe``, optional ``safer_response``; docs/DATA.md): then
    the batch has bool ``chosen_unsafe`` / ``rejected_unsafe`` and float ``harm_order``
    (:func:`harm_order`), each (B,). Either every row of a batch has a signal field (safety labels)
    or none does.
    """

    SIGNAL_FIELDS = ("chosen_token_signal", "rejected_token_signal")

    def encode(self, record: Mapping[str, Any]) -> Features:
        prompt_ids, _, prompt_cut = self.encode_prompt(record["prompt"])
        out: Features = {"group": record.get("group", "general"), "prompt_truncated": prompt_cut}
        for side in ("chosen", "rejected"):
            full = self._ids(record[side]) + [self.eos_token_id]
            response_ids, cut = self.encode_response(len(prompt_ids), record[side])
            out[f"{side}_input_ids"] = prompt_ids + response_ids
            out[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt_ids) + response_ids
            out[f"{side}_truncated"] = cut
            signal = self._signal(record, f"{side}_token_signal", len(full), len(response_ids))
            if signal is not None:
                out[f"{side}_token_signal"] = [0.0] * len(prompt_ids) + signal
        if all(record.get(k) is not None for k in SAFETY_LABEL_FIELDS):
            out.update({k: bool(record[k]) for k in SAFETY_LABEL_FIELDS}, harm_order=harm_order(record))
        out["pair_kind"] = pair_kind(record)
        return out

    def __call__(self, features: Sequence[Features]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        for side in ("chosen", "rejected"):
            ids = [f[f"{side}_input_ids"] for f in features]
            batch[f"{side}_input_ids"] = _right_pad(ids, self.pad_token_id, torch.long)
            batch[f"{side}_attention_mask"] = _right_pad([[1] * len(r) for r in ids], 0, torch.long)
            batch[f"{side}_labels"] = _right_pad([f[f"{side}_labels"] for f in features], IGNORE_INDEX, torch.long)
            batch[f"{side}_truncated"] = torch.tensor([bool(f[f"{side}_truncated"]) for f in features], dtype=torch.bool)
            key = f"{side}_token_signal"
            has = [key in f for f in features]
            if any(has):
                if not all(has):
                    missing = [int(f["index"]) for f in features if key not in f]
                    raise ValueError(f"{key}: rows {missing} of this batch have no signal while others do")
                batch[key] = _right_pad([f[key] for f in features], 0.0, torch.float32)
        labelled = ["harm_order" in f for f in features]
        if any(labelled):
            if not all(labelled):
                missing = [int(f["index"]) for f in features if "harm_order" not in f]
                raise ValueError(f"chosen_unsafe / rejected_unsafe: rows {missing} of this batch have no safety labels while others do")
            for key in SAFETY_LABEL_FIELDS:
                batch[key] = torch.tensor([f[key] for f in features], dtype=torch.bool)
            batch["harm_order"] = torch.tensor([f["harm_order"] for f in features], dtype=torch.float32)
        batch["pair_kind"] = [str(f.get("pair_kind", "pair")) for f in features]
        batch.update(_common(features))
        return batch


class PromptCollator(_Collator):
    """Prompt batches for generation: LEFT-padded ``input_ids``/``attention_mask``, ``prompt_text``.

    ``max_length`` only bounds ``max_prompt_length`` here; how long to generate is the caller's.
    """

    def encode(self, record: Mapping[str, Any]) -> Features:
        ids, text, cut = self.encode_prompt(record["prompt"])
        return {"input_ids": ids, "prompt_text": text, "prompt_truncated": cut, "group": record.get("group", "general")}

    def __call__(self, features: Sequence[Features]) -> dict[str, Any]:
        ids = [f["input_ids"] for f in features]
        width = max((len(r) for r in ids), default=0)
        # Left padding: every prompt ends at the last column, where generation continues.
        input_ids = torch.tensor([[self.pad_token_id] * (width - len(r)) + list(r) for r in ids], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids], dtype=torch.long)
        return {
            "input_ids": input_ids.reshape(len(ids), width),
            "attention_mask": mask.reshape(len(ids), width),
            "prompt_text": [f["prompt_text"] for f in features],
            **_common(features),
        }


COLLATORS: dict[str, type[_Collator]] = {"sft": SFTCollator, "preference": PreferenceCollator, "prompt": PromptCollator}


def build_collator(kind: str, tokenizer: Any, max_length: int = 256, max_prompt_length: int = 128) -> _Collator:
    """The collator for a record kind: ``sft`` | ``preference`` | ``prompt``."""
    if kind not in COLLATORS:
        raise ValueError(f"unknown batch kind {kind!r}; expected one of {sorted(COLLATORS)}")
    return COLLATORS[kind](tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)


class EncodedDataset(Dataset):
    """Records tokenized once, up front; items are encoded features plus ``index``.

    Tokenizing in ``__init__`` (main process) means epochs, workers and resumed runs never
    tokenize again, and a bad row fails at set-up, naming the row, not in a worker mid-epoch.
    """

    def __init__(self, records: Iterable[Mapping[str, Any]], collator: _Collator) -> None:
        self.features: list[Features] = []
        for i, record in enumerate(records):
            try:
                self.features.append(collator.encode(record))
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"row {i} (id={record.get('id', '?')!r}, source={record.get('source', '?')!r}): {err}") from err

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> Features:
        return {**self.features[index], "index": index}

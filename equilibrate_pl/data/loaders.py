"""Load prompt / preference / SFT records from files, with errors that name file, row and field.

One entry point, :func:`load_records`, reads JSONL (optionally gzipped), JSON (a list of objects),
CSV, Parquet, a `datasets` dataset saved with ``save_to_disk`` or a hub id (through
``datasets.load_dataset``; online use only). A column mapping renames source columns to the
schema fields of :mod:`equilibrate_pl.data.schema`; a *preset* bundles the mapping and the parsing
a real format needs (XSTest, the FDC-labelled BeaverTails prompts, hh-rlhf transcripts).

Rows are numbered from 1 over data rows (the CSV header is not a row; a JSONL row is its line).
A bad row raises :class:`DataError` (``on_bad_row="raise"``) or is counted in
:attr:`LoadResult.skipped` and reported in a warning (``on_bad_row="skip"``); nothing is dropped
silently.

``group`` after loading is a name from ``GROUP_NAMES``, or ``None`` when the source has no FDC
label for the row (e.g. XSTest's unsafe prompts, hh-rlhf): such rows are meant to be labelled by a
categorizer (:mod:`equilibrate_pl.data.fdc`) or forced with ``DataSource.group``.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping

from equilibrate_pl.data.schema import (
    BEAVERTAILS_GROUP_LABELS,
    GROUP_NAMES,
    RECORD_FIELDS,
    REQUIRED_FIELDS,
    SAFETY_FIELDS,
    SAFETY_LABEL_FIELDS,
    SIGNAL_FIELDS,
    Group,
)
from equilibrate_pl.files import atomic_write_jsonl

__all__ = [
    "DataError",
    "DataSource",
    "SkippedRow",
    "LoadResult",
    "PRESETS",
    "load_records",
    "parse_transcript",
    "write_jsonl",
]

log = logging.getLogger(__name__)

# Record fields each kind keeps at top level; every other column goes to `meta`.
_MESSAGE_ROLES = ("system", "user", "assistant")
# Rows named per reason in a skip report before "and N more".
_ROWS_SHOWN = 10


class DataError(ValueError):
    """Bad input data. ``str(err)`` reads ``"<file>, row <n>, field '<f>': <what is wrong>"``."""

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None, field: str | None = None):
        self.file, self.row, self.field, self.reason = file, row, field, message
        where = [file or "<data>"]
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}")


@dataclass
class DataSource:
    """A config-friendly description of one data file (jsonargparse builds it from YAML).

    Args:
        path: file, ``save_to_disk`` directory, or hub dataset id.
        kind: ``prompt`` | ``preference`` | ``sft``; ``None`` means the preset's kind, else ``prompt``.
        preset: a key of :data:`PRESETS` (``xstest``, ``xstest-completions``, ``beavertails-fdc``, ``hh-rlhf``,
            ``pku-saferlhf``, ``beavertails``).
        columns: source column -> schema field renames (applied on top of the preset's).
        format: ``jsonl`` | ``json`` | ``csv`` | ``parquet`` | ``disk`` | ``hub``; inferred when ``None``.
        split: split for dataset dicts and hub ids (default ``train``).
        group: force this group on every row (e.g. a file of general helpfulness data).
        name: the ``source`` written on each record (default: the file name).
    """

    path: str
    kind: str | None = None
    preset: str | None = None
    columns: dict[str, str] | None = None
    format: str | None = None
    split: str | None = None
    group: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class SkippedRow:
    row: int | None
    field: str | None
    reason: str


@dataclass
class LoadResult:
    records: list[dict[str, Any]]
    skipped: list[SkippedRow]
    source: str

    def __len__(self) -> int:
        return len(self.records)

    def group_counts(self) -> dict[str, int]:
        return dict(Counter(str(r.get("group")) for r in self.records))

    def summary(self) -> str:
        """Records loaded and rows skipped, each reason with the rows it hit (the first few of them)."""
        text = f"{self.source}: {len(self.records)} records loaded, {len(self.skipped)} rows skipped"
        if self.skipped:
            rows: dict[str, list[int | None]] = {}
            for s in self.skipped:
                rows.setdefault(f"field {s.field!r}: {s.reason}" if s.field else s.reason, []).append(s.row)
            parts = []
            for reason, hit in sorted(rows.items(), key=lambda item: -len(item[1])):
                shown = ", ".join(str(r) for r in hit[:_ROWS_SHOWN])
                more = f" and {len(hit) - _ROWS_SHOWN} more" if len(hit) > _ROWS_SHOWN else ""
                parts.append(f"{'rows' if len(hit) > 1 else 'row'} {shown}{more}: {reason}")
            text += " (" + "; ".join(parts) + ")"
        return text


# --------------------------------------------------------------------------------------------
# presets


def parse_transcript(text: str) -> list[dict[str, str]]:
    """Split an Anthropic-style ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` transcript into messages."""
    parts = re.split(r"\n\nHuman: |\n\nAssistant: ", text)
    roles = re.findall(r"\n\n(Human|Assistant): ", text)
    if parts[0].strip():
        raise ValueError("transcript must start with '\\n\\nHuman: '")
    return [{"role": "user" if r == "Human" else "assistant", "content": c.strip()} for r, c in zip(roles, parts[1:])]


def _hh_rlhf(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    split = {}
    for key in ("chosen", "rejected"):
        text = row.get(key)
        if not isinstance(text, str):
            raise DataError(f"expected a transcript string, got {_type_name(text)}", field=key)
        try:
            messages = parse_transcript(text)
        except ValueError as err:
            raise DataError(str(err), field=key) from None
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise DataError("transcript must end with an 'Assistant:' turn after at least one 'Human:' turn", field=key)
        split[key] = messages
    if split["chosen"][:-1] != split["rejected"][:-1]:
        raise DataError("the transcript before the final answer differs from the one in 'chosen'", field="rejected")
    out["prompt"] = split["chosen"][:-1]
    out["chosen"] = split["chosen"][-1]["content"]
    out["rejected"] = split["rejected"][-1]["content"]
    return out


def _xstest(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    label = row.get("label")
    if label not in ("safe", "unsafe"):
        raise DataError(f"expected 'safe' or 'unsafe', got {label!r}", field="label")
    # XSTest's safe prompts only look risky: FDC puts them in `general`. The unsafe contrasts carry
    # no FDC label; a categorizer decides.
    out["group"] = "general" if label == "safe" else None
    out["id"] = f"xstest-{row['id']}" if row.get("id") not in (None, "") else None
    return out


def _xstest_completions(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    type_ = row.get("type")
    if not isinstance(type_, str) or not type_:
        raise DataError(f"expected a non-empty string, got {_type_name(type_)}", field="type")
    # The completion files have no safe/unsafe column; XSTest's unsafe prompts are exactly the contrast types.
    out["label"] = "unsafe" if type_.startswith("contrast_") else "safe"
    out["group"] = "general" if out["label"] == "safe" else None
    return out


def _beavertails(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    out["label"] = row.get("group")  # keep the authors' original label (e.g. "No risk") in meta
    return out


def _pku_saferlhf(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    safer = row.get("safer_response_id")
    if safer not in (0, 1) or isinstance(safer, bool):
        raise DataError(f"expected 0 or 1, got {safer!r}", field="safer_response_id")
    # chosen = the safer response (the harmlessness preference); the helpfulness one stays in meta.
    out["chosen"], out["rejected"] = out.pop(f"response_{safer}", None), out.pop(f"response_{1 - safer}", None)
    flags = [row.get(f"is_response_{i}_safe") for i in (0, 1)]
    if any(flag is not None for flag in flags):  # the cost model's labels (docs/DATA.md)
        for i, flag in enumerate(flags):
            if not isinstance(flag, bool):
                raise DataError(f"expected true or false, got {flag!r}", field=f"is_response_{i}_safe")
        out["chosen_unsafe"], out["rejected_unsafe"] = not flags[safer], not flags[1 - safer]
        out["safer_response"] = "chosen"
    return out


def _beavertails_qa(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    if not isinstance(row.get("is_safe"), bool):
        raise DataError(f"expected true or false, got {row.get('is_safe')!r}", field="is_safe")
    # BeaverTails' 14 harm categories are not FDC groups: a categorizer decides the group.
    out["label"] = "safe" if row["is_safe"] else "unsafe"
    return out


@dataclass(frozen=True)
class Preset:
    kind: str
    columns: Mapping[str, str]
    parse: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    group_map: Mapping[str, str] | None = None
    kinds: tuple[str, ...] = ()  # other kinds the preset can produce (fields of a richer kind are dropped)


PRESETS: dict[str, Preset] = {
    "xstest": Preset("prompt", {}, _xstest),
    "xstest-completions": Preset("sft", {"completion": "response"}, _xstest_completions, kinds=("prompt",)),
    "beavertails-fdc": Preset("prompt", {"question_y": "prompt", "category": "group"}, _beavertails, BEAVERTAILS_GROUP_LABELS),
    "hh-rlhf": Preset("preference", {}, _hh_rlhf, kinds=("prompt",)),
    "pku-saferlhf": Preset("preference", {}, _pku_saferlhf, kinds=("prompt",)),
    "beavertails": Preset("prompt", {}, _beavertails_qa, kinds=("sft",)),
}


# --------------------------------------------------------------------------------------------
# readers: yield (row number, raw dict) or (row number, DataError)

RawRow = tuple[int, "dict[str, Any] | DataError"]


_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def _infer_format(path: Path, raw: str) -> str:
    if path.is_dir():
        if any((path / m).is_file() for m in _DISK_MARKERS):
            return "disk"
        raise DataError("a directory, not a file (nor a `datasets` save_to_disk directory); give one data file", file=raw)
    name = path.name.lower().removesuffix(".gz")
    for fmt in ("jsonl", "json", "csv", "parquet"):
        if name.endswith("." + fmt):
            return fmt
    if not path.exists():
        # A hub id looks like `name` or `owner/name`; `data/prompts` where ./data exists is a local
        # path with a typo, not a request to go online.
        if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", raw) and not raw.startswith(".") and not Path(raw.split("/")[0]).is_dir():
            return "hub"
        raise DataError("file not found", file=raw)
    raise DataError("cannot infer the format from the file name; set `format` (jsonl|json|csv|parquet|disk|hub)", file=raw)


def _read_bytes(path: Path, file: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError("file not found", file=file) from None
    if path.name.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise DataError(f"not a valid gzip file ({err})", file=file) from None
    if not data.strip():
        raise DataError("file is empty", file=file)
    _check_encoding(data, file)
    return data


# Longest first: the UTF-32-LE mark starts with the UTF-16-LE one.
_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32-LE"), (b"\x00\x00\xfe\xff", "UTF-32-BE"), (b"\xff\xfe", "UTF-16-LE"), (b"\xfe\xff", "UTF-16-BE"))


def _check_encoding(data: bytes, file: str) -> None:
    """Text files are read as UTF-8; a UTF-16/32 file would otherwise surface as 'missing column'."""
    encoding = next((name for bom, name in _BOMS if data.startswith(bom)), None)
    how = "byte-order mark"
    if encoding is None and b"\x00" in data[:4096]:
        # No mark: ASCII text in UTF-16 has a NUL in every other byte (which side tells the order).
        head = data[:4096]
        if head[1::2].count(0) > len(head) // 4:
            encoding, how = "UTF-16-LE", "NUL bytes, no byte-order mark"
        elif head[0::2].count(0) > len(head) // 4:
            encoding, how = "UTF-16-BE", "NUL bytes, no byte-order mark"
        else:
            raise DataError("holds NUL bytes: not a UTF-8 text file", file=file)
    if encoding is not None:
        raise DataError(
            f"encoded as {encoding} ({how}), not UTF-8; convert it, e.g. `iconv -f {encoding.rsplit('-', 1)[0]} -t UTF-8 "
            f"{file} > {Path(file).stem}.utf8{Path(file).suffix}`", file=file,
        )


def _decode(data: bytes) -> str:
    # surrogateescape keeps invalid bytes as lone surrogates, so the row/field check in
    # _check_strings can say exactly where the bad bytes are instead of failing the whole file.
    return data.decode("utf-8-sig", errors="surrogateescape")


def _read_jsonl(path: Path, file: str) -> Iterator[RawRow]:
    lines = _read_bytes(path, file).split(b"\n")
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(_decode(line))
        except json.JSONDecodeError as err:
            yield lineno, DataError(f"malformed JSON ({err.msg} at column {err.colno})", row=lineno)
            continue
        if not isinstance(obj, dict):
            yield lineno, DataError(f"expected a JSON object, got {_type_name(obj)}", row=lineno)
            continue
        yield lineno, obj


def _read_json(path: Path, file: str) -> Iterator[RawRow]:
    try:
        obj = json.loads(_decode(_read_bytes(path, file)))
    except json.JSONDecodeError as err:
        raise DataError(f"malformed JSON ({err.msg} at line {err.lineno}, column {err.colno})", file=file) from None
    if isinstance(obj, dict):  # {"data": [...]} style wrappers
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError("expected a JSON list of objects (or an object holding exactly one list)", file=file)
        obj = lists[0]
    if not isinstance(obj, list):
        raise DataError(f"expected a JSON list of objects, got {_type_name(obj)}", file=file)
    if not obj:
        raise DataError("file is empty (an empty JSON list)", file=file)
    for i, item in enumerate(obj, 1):
        yield i, item if isinstance(item, dict) else DataError(f"expected a JSON object, got {_type_name(item)}", row=i)


def _read_csv(path: Path, file: str) -> Iterator[RawRow]:
    text = _decode(_read_bytes(path, file))
    # The csv module refuses fields over 131072 characters by default: a guard against reading a
    # huge file into memory, which has already happened here. Length limits are max_chars's job.
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header or not any(h.strip() for h in header):
        raise DataError("file is empty (no header)", file=file)
    header = [h.strip() for h in header]
    seen: dict[str, int] = {}
    for i, name in enumerate(header, 1):
        if name in seen:
            raise DataError(f"appears twice in the header (columns {seen[name]} and {i}); rename one", file=file, field=name)
        seen[name] = i
    n = 0
    for values in reader:
        if not any(v.strip() for v in values):
            continue  # blank lines are not rows (and do not shift the numbering)
        n += 1
        if len(values) != len(header):
            yield n, DataError(f"expected {len(header)} columns, got {len(values)}", row=n)
            continue
        # CSV has no null: an empty cell is "missing", which _check_text reports as such.
        yield n, {h: (v if v != "" else None) for h, v in zip(header, values)}
    if n == 0:
        raise DataError("file is empty (a header but no data rows)", file=file)


def _iter_table(rows: Iterator[dict[str, Any]], file: str) -> Iterator[RawRow]:
    n = 0
    for n, row in enumerate(rows, 1):
        yield n, dict(row)
    if n == 0:
        raise DataError("file is empty (no rows)", file=file)


def _read_parquet(path: Path, file: str) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    if path.stat().st_size == 0:
        raise DataError("file is empty", file=file)
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a broken file
        raise DataError(f"cannot read parquet ({err})", file=file) from None
    yield from _iter_table(iter(table.to_pylist()), file)


def _read_datasets(source: DataSource, fmt: str, file: str) -> Iterator[RawRow]:
    import datasets

    if fmt == "disk":
        try:
            ds = datasets.load_from_disk(source.path)
        except (FileNotFoundError, ValueError) as err:
            raise DataError(f"not a `datasets` save_to_disk directory ({_first_line(err)})", file=file) from None
        if isinstance(ds, datasets.DatasetDict):
            split = source.split or "train"
            if split not in ds:
                raise DataError(f"split {split!r} not found; available: {list(ds)}", file=file)
            ds = ds[split]
    else:
        try:
            ds = datasets.load_dataset(source.path, split=source.split or "train")
        except Exception as err:  # offline, unknown id, gated, no such split: datasets raises many types
            raise DataError(f"not a local file, and loading it as a Hugging Face hub dataset failed "
                            f"({type(err).__name__}: {_first_line(err)})", file=file) from None
    yield from _iter_table(iter(ds), file)


def _first_line(err: BaseException) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


# --------------------------------------------------------------------------------------------
# validation


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, float) and math.isnan(value):
        return "NaN (empty cell)"
    return type(value).__name__


def _bad_utf8(value: Any) -> bool:
    if isinstance(value, str):
        return any("\udc80" <= ch <= "\udcff" for ch in value)
    if isinstance(value, dict):
        return any(_bad_utf8(v) for v in value.values())
    if isinstance(value, list):
        return any(_bad_utf8(v) for v in value)
    return False


def _check_text(value: Any, name: str, max_chars: int) -> str:
    if not isinstance(value, str):
        raise DataError(f"expected a non-empty string, got {_type_name(value)}", field=name)
    if not value.strip():
        raise DataError("expected a non-empty string, got an empty string", field=name)
    if len(value) > max_chars:
        raise DataError(f"{len(value)} characters, over the limit max_chars={max_chars}", field=name)
    return value


def _check_prompt(value: Any, name: str, max_chars: int) -> str | list[dict[str, str]]:
    if isinstance(value, str):
        return _check_text(value, name, max_chars)
    if not isinstance(value, list) or not value:
        raise DataError(f"expected a non-empty string or a non-empty message list, got {_type_name(value)}", field=name)
    messages = []
    for i, msg in enumerate(value):
        if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
            raise DataError(f"message {i}: expected an object with 'role' and 'content'", field=name)
        role = msg["role"]
        if role not in _MESSAGE_ROLES:
            raise DataError(f"message {i}: unknown role {role!r}; expected one of {list(_MESSAGE_ROLES)}", field=name)
        if role == "system" and i != 0:
            raise DataError(f"message {i}: a 'system' message may only come first", field=name)
        try:
            content = _check_text(msg["content"], name, max_chars)
        except DataError as err:
            raise DataError(f"message {i} content: {err.reason}", field=name) from None
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise DataError(f"the last message must be from 'user' (the model answers next), got {messages[-1]['role']!r}", field=name)
    total = sum(len(m["content"]) for m in messages)
    if total > max_chars:
        raise DataError(f"{total} characters over all messages, over the limit max_chars={max_chars}", field=name)
    return messages


def _check_signal(value: Any, name: str) -> list[float]:
    """A per-token signal column: a list of finite numbers (in CSV, the list written as JSON)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"expected a list of numbers (JSON in a text column), got {value[:40]!r}", field=name) from None
    if hasattr(value, "tolist"):  # numpy / pyarrow arrays from parquet or datasets
        value = value.tolist()
    if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
        raise DataError(f"expected a list of numbers, one per response token, got {_type_name(value)}", field=name)
    if not value:
        raise DataError("expected a list of numbers, one per response token, got an empty list", field=name)
    if not all(math.isfinite(v) for v in value):
        raise DataError("expected finite numbers, got NaN or infinity", field=name)
    return [float(v) for v in value]


_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


def _check_flag(value: Any, name: str) -> bool:
    """A boolean column: true/false (JSON, parquet), or in a text column true/false, yes/no, 1/0."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy / pyarrow scalars
        value = value.item()
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise DataError(f"expected true or false, got {value!r}", field=name)


def _check_safety_labels(row: Mapping[str, Any]) -> dict[str, Any]:
    """The optional safety labels of a preference pair (schema.SAFETY_FIELDS), checked: both flags or
    neither, ``safer_response`` only with them and only ``chosen`` / ``rejected``."""
    given = [k for k in SAFETY_LABEL_FIELDS if row.get(k) is not None and row.get(k) != ""]
    safer = row.get("safer_response")
    safer = None if safer is None or safer == "" else safer
    if not given:
        if safer is not None:
            raise DataError("given without the chosen_unsafe / rejected_unsafe labels it orders", field="safer_response")
        return {}
    if len(given) == 1:
        missing = next(k for k in SAFETY_LABEL_FIELDS if k not in given)
        raise DataError(f"missing while {given[0]!r} is given (a pair's safety labels come together)", field=missing)
    out: dict[str, Any] = {k: _check_flag(row[k], k) for k in SAFETY_LABEL_FIELDS}
    if safer is not None:
        if safer not in ("chosen", "rejected"):
            raise DataError(f"expected 'chosen' or 'rejected', got {safer!r}", field="safer_response")
        out["safer_response"] = safer
    return out


def _resolve_group(value: Any, group_map: Mapping[str, str], name: str) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return None
    if not isinstance(value, str):
        raise DataError(f"expected a group label string, got {_type_name(value)}", field=name)
    mapped = group_map.get(value.strip().lower(), value)
    try:
        return Group.parse(mapped).value
    except ValueError:
        known = list(GROUP_NAMES) + [k for k in group_map if k not in GROUP_NAMES]
        raise DataError(f"unknown group label {value!r}; expected one of {known} (or map it with group_map)", field=name) from None


# --------------------------------------------------------------------------------------------
# the entry point


def load_records(
    source: DataSource | str | os.PathLike,
    kind: str | None = None,
    *,
    columns: Mapping[str, str] | None = None,
    preset: str | None = None,
    on_bad_row: Literal["raise", "skip"] = "raise",
    max_chars: int = 20000,
    group_map: Mapping[str, str] | None = None,
    require_group: bool = False,
    require_safety_labels: bool = False,
) -> LoadResult:
    """Read ``source`` into validated records of ``kind``.

    Arguments given here override the matching ``DataSource`` fields. ``group_map`` maps extra
    labels (case-insensitive) to group names, e.g. ``{"unsafe": "EHD"}``; a label that is neither a
    group name nor mapped is an error. ``require_group``: a row without an FDC group is a bad row
    (safety data that no categorizer will label). ``require_safety_labels``: a preference row without
    ``chosen_unsafe`` / ``rejected_unsafe`` is a bad row (the cost model's data). Returns every good
    record plus the skipped rows.
    """
    if not isinstance(source, DataSource):
        source = DataSource(path=str(source))
    if on_bad_row not in ("raise", "skip"):
        raise ValueError(f"on_bad_row must be 'raise' or 'skip', got {on_bad_row!r}")
    preset_name = preset or source.preset
    spec = None
    if preset_name is not None:
        if preset_name not in PRESETS:
            raise ValueError(f"unknown preset {preset_name!r}; expected one of {sorted(PRESETS)}")
        spec = PRESETS[preset_name]
    kind = kind or source.kind or (spec.kind if spec else "prompt")
    if kind not in REQUIRED_FIELDS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {sorted(REQUIRED_FIELDS)}")
    if spec is not None and kind != spec.kind and kind not in spec.kinds:
        raise ValueError(f"preset {preset_name!r} gives {spec.kind!r} records{' or ' + str(list(spec.kinds)) if spec.kinds else ''}, not {kind!r}")
    mapping = {**(spec.columns if spec else {}), **(columns or source.columns or {})}
    gmap = {k.strip().lower(): v for k, v in {**((spec.group_map or {}) if spec else {}), **(group_map or {})}.items()}
    forced_group = _resolve_group(source.group, {}, "group") if source.group is not None else None

    path = Path(source.path)
    file = path.name if path.name else source.path
    fmt = source.format or _infer_format(path, source.path)
    readers: dict[str, Callable[[], Iterator[RawRow]]] = {
        "jsonl": lambda: _read_jsonl(path, file),
        "json": lambda: _read_json(path, file),
        "csv": lambda: _read_csv(path, file),
        "parquet": lambda: _read_parquet(path, file),
        "disk": lambda: _read_datasets(source, "disk", file),
        "hub": lambda: _read_datasets(source, "hub", file),
    }
    if fmt not in readers:
        raise ValueError(f"unknown format {fmt!r}; expected one of {sorted(readers)}")
    name = source.name or file
    back = {dst: src for src, dst in mapping.items()}  # report errors under the file's column names

    records: list[dict[str, Any]] = []
    skipped: list[SkippedRow] = []
    for row_no, raw in readers[fmt]():
        try:
            if isinstance(raw, DataError):
                raise raw
            record = _make_record(raw, row_no, kind, mapping, spec, gmap, forced_group, name, max_chars)
            if require_group and record["group"] is None:
                raise DataError("no FDC group (EHD, IHD, MHD or general): add a `group` column, set the source's "
                                "`group`, or configure a categorizer", field="group")
            if require_safety_labels and record.get("chosen_unsafe") is None:
                raise DataError("missing: the cost model needs each pair's safety labels, chosen_unsafe and "
                                "rejected_unsafe (docs/DATA.md)", field="chosen_unsafe")
        except DataError as err:
            err = DataError(err.reason, file=file, row=row_no, field=back.get(err.field, err.field) if err.field else None)
            if on_bad_row == "raise":
                raise err from None
            skipped.append(SkippedRow(row_no, err.field, err.reason))
            continue
        records.append(record)

    result = LoadResult(records, skipped, name)
    if skipped:
        if not records:
            first = skipped[0]
            raise DataError(f"every row is bad ({len(skipped)} skipped); first: {first.reason}", file=file, row=first.row, field=first.field)
        log.warning("%s", result.summary())
    return result


def _make_record(
    raw: dict[str, Any],
    row_no: int,
    kind: str,
    mapping: Mapping[str, str],
    spec: Preset | None,
    group_map: Mapping[str, str],
    forced_group: str | None,
    source_name: str,
    max_chars: int,
) -> dict[str, Any]:
    for col, value in raw.items():
        if _bad_utf8(value):
            raise DataError("invalid UTF-8 bytes", field=mapping.get(col, col))
    row = {mapping.get(k, k): v for k, v in raw.items()}
    if spec is not None and spec.parse is not None:
        for required in spec.columns.values():
            if required not in row:
                raise DataError(f"missing (columns present: {', '.join(map(str, raw))})", field=required)
        row = spec.parse(row)

    record: dict[str, Any] = {}
    for required in REQUIRED_FIELDS[kind]:
        if required not in row:
            raise DataError(f"missing (columns present: {', '.join(map(str, raw)) or 'none'}; rename with `columns`)", field=required)
        value = row[required]
        record[required] = _check_prompt(value, required, max_chars) if required == "prompt" else _check_text(value, required, max_chars)

    if kind == "preference":
        for name in SIGNAL_FIELDS:
            if row.get(name) is not None:
                record[name] = _check_signal(row[name], name)
        record.update(_check_safety_labels(row))

    rid = row.get("id")
    record["id"] = f"{source_name}-{row_no}" if rid is None or rid == "" else str(rid)
    record["group"] = forced_group if forced_group is not None else _resolve_group(row.get("group"), group_map, "group")
    src = row.get("source")
    record["source"] = src if isinstance(src, str) and src else source_name
    meta = dict(row["meta"]) if isinstance(row.get("meta"), Mapping) else {}
    keep = set(RECORD_FIELDS[kind]) | (set(SIGNAL_FIELDS) | set(SAFETY_FIELDS) if kind == "preference" else set())
    for key, value in row.items():
        if key not in keep and value is not None:
            meta[key] = value
    record["meta"] = meta
    return record


def write_jsonl(records: Iterator[Mapping[str, Any]] | list[Mapping[str, Any]], path: str | os.PathLike) -> int:
    """Write records as JSONL atomically (``equilibrate_pl.files``); returns how many. NaN / infinity
    become ``null``, values JSON does not know (dates or decimals in a parquet row's meta) strings."""
    return atomic_write_jsonl(path, records)

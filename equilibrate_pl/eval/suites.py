"""Evaluation suites: prompts, each marked harmful (safety is measured) or benign (over-refusal and
helpfulness are measured), with an FDC group where the source has one.

- `builtin`: the eval split of the built-in safety world (`data.world.build_world(seed)`); its
  look-alike and general prompts are benign.
- `xstest`: XSTest's 250 safe prompts (benign, group `general`) and 200 unsafe contrasts (harmful,
  no FDC group: they count in `overall` only).
- `beavertails-fdc`: the FDC-labelled BeaverTails prompts; all are harmful except `No risk`.
  Its `OTHER` category (risky, but in none of the three groups) is harmful with group `general`.
- `xstest-pairs` (a pair suite, `load_pair_suite`): RewardBench-style preference pairs built from
  XSTest's labelled completions, for scoring reward / cost models (`eval.pairs`).
- a file (JSONL / JSON / CSV / Parquet): a `prompt` column, optional `group` and `label`
  (`harmful`/`unsafe`/`1`/`true` or `benign`/`safe`/`0`/`false`); without a label a row is harmful
  iff its group is EHD/IHD/MHD.

Real-data suites are found through `equilibrate_pl.data.catalog` (`$EQUILIBRATE_DATA`, the download
folder of `equilibrate data download`, `../shared/data` beside the repository; downloaded on first
use when the network is allowed); a path can always be given instead (`xstest:/path/to/xstest_prompts.csv`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from equilibrate_pl.data.loaders import DataError, load_records
from equilibrate_pl.data.schema import SAFETY_GROUPS, PromptLike

__all__ = ["EvalItem", "Suite", "load_suite", "load_pair_suite", "SUITES", "PAIR_SUITES"]

SUITES = ("builtin", "xstest", "beavertails-fdc")
PAIR_SUITES = ("xstest-pairs",)
_HARMFUL_LABELS = {"harmful", "unsafe", "1", "true", "yes"}
_BENIGN_LABELS = {"benign", "safe", "0", "false", "no"}


@dataclass(frozen=True)
class EvalItem:
    id: str
    prompt: PromptLike
    harmful: bool
    group: str | None
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Suite:
    name: str
    items: list[EvalItem]

    def __len__(self) -> int:
        return len(self.items)

    def limit(self, n: int | None, seed: int = 0) -> "Suite":
        """A seeded random subset of `n` items (all if `n` is None or larger), kept in suite order."""
        if n is None or n >= len(self.items):
            return self
        if n < 1:
            raise ValueError(f"limit must be >= 1, got {n}")
        keep = sorted(random.Random(seed).sample(range(len(self.items)), n))
        return Suite(self.name, [self.items[i] for i in keep])

    def describe(self) -> str:
        harmful = sum(it.harmful for it in self.items)
        return f"suite {self.name}: {len(self.items)} prompts ({harmful} harmful, {len(self.items) - harmful} benign)"


def _default_file(name: str) -> Path:
    from equilibrate_pl.data.catalog import DatasetNotFound, require

    try:
        return require(name)
    except DatasetNotFound as err:
        raise FileNotFoundError(f"suite {name!r}: {err}; or pass the file: --suite {name}:/path/to/file") from None


def _builtin(seed: int) -> list[EvalItem]:
    from equilibrate_pl.data.world import build_world

    return [
        EvalItem(r["id"], r["prompt"], r["meta"]["ideal"] == "refuse", r["group"], r.get("source", "builtin-world"), r["meta"])
        for r in build_world(seed).prompts("eval")
    ]


def _from_records(records: list[dict[str, Any]], file: str, harmful_of) -> list[EvalItem]:
    items = []
    for row, r in enumerate(records, start=1):
        items.append(EvalItem(str(r.get("id") or f"{file}-{row}"), r["prompt"], harmful_of(r, row), r.get("group"),
                              r.get("source", file), r.get("meta", {})))
    return items


def _file_label(record: dict[str, Any], row: int, file: str) -> bool:
    label = record.get("meta", {}).get("label")
    if label is None or label == "":
        return record.get("group") in {g.value for g in SAFETY_GROUPS}
    value = str(label).strip().lower()
    if value in _HARMFUL_LABELS:
        return True
    if value in _BENIGN_LABELS:
        return False
    raise DataError(f"expected one of {sorted(_HARMFUL_LABELS | _BENIGN_LABELS)}, got {label!r}", file=file, row=row, field="label")


def load_suite(spec: str, *, seed: int = 0) -> Suite:
    """`builtin`, `xstest[:PATH]`, `beavertails-fdc[:PATH]` or a file path."""
    name, _, arg = spec.partition(":")
    if name == "builtin" and not arg:
        return Suite("builtin", _builtin(seed))
    if name == "xstest":
        path = Path(arg) if arg else _default_file("xstest")
        records = load_records(str(path), preset="xstest").records
        return Suite("xstest", _from_records(records, path.name, lambda r, _: r["meta"]["label"] == "unsafe"))
    if name == "beavertails-fdc":
        path = Path(arg) if arg else _default_file("beavertails-fdc")
        records = load_records(str(path), preset="beavertails-fdc").records
        return Suite("beavertails-fdc", _from_records(records, path.name, lambda r, _: r["meta"].get("label") != "No risk"))
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"--suite {spec!r}: not one of {list(SUITES)} and no such file")
    records = load_records(str(path), kind="prompt").records
    return Suite(path.stem, _from_records(records, path.name, lambda r, row: _file_label(r, row, path.name)))


def load_pair_suite(spec: str) -> tuple[str, list[Any]]:
    """`xstest-pairs[:DIR]` -> (name, `eval.pairs.PreferencePair` list); DIR holds XSTest's prompt
    and labelled completion CSVs (default: the `xstest` folder beside `xstest_prompts.csv`)."""
    from equilibrate_pl.eval.pairs import xstest_pairs

    name, _, arg = spec.partition(":")
    if name not in PAIR_SUITES:
        raise ValueError(f"unknown pair suite {spec!r}; expected one of {list(PAIR_SUITES)}")
    folder = Path(arg) if arg else _default_file("xstest").parent
    return name, xstest_pairs(folder)

"""FDC data mixing: how much of each safety group goes beside the general data.

Pure python (no torch): a mix is a list of records plus an account of what was asked for and
what was available, so that a short group is reported, never silently under-filled.

Modes (docs/METHOD.md section 2, docs/DATA.md):
- ``ratio``: ``n_group = round(len(general) / ratios[group])`` safety rows per group, i.e. one
  safety row of that group per ``ratios[group]`` general rows. Defaults come from the paper's
  draft (EHD 1:20-1:30, IHD 1:50-1:100, MHD 1:100-1:200; we take the middle of each range).
- ``quota``: absolute counts per group (the paper's best mix: 10k EHD, 3k IHD, 1k MHD).
- ``all``: every row of both pools.
- ``sorted``: every general row and every safety row of the three harmful groups; safety rows a
  categorizer cleared as ``general`` (benign look-alikes in a safety set) are left out, with a
  note. What a reward model trained on FDC-sorted data sees.
- :func:`naive`: unsorted safety rows drawn uniformly, ignoring groups (the baseline arm that
  "just adds more safety data").

Sampling is stratified by group and deterministic in ``seed``: each group draws from its own
``random.Random`` seeded from ``(seed, group)``, so changing one group's amount does not change
which rows another group gets.
"""

from __future__ import annotations

import math
import random
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

from equilibrate_pl.data.schema import SAFETY_GROUPS, Group

Record = dict[str, Any]
MixMode = Literal["ratio", "quota", "all", "sorted"]

# General rows per ONE safety row of the group: middle of the ranges in the paper's draft.
DEFAULT_RATIOS: dict[str, float] = {"EHD": 25.0, "IHD": 75.0, "MHD": 150.0}
# The paper's best reported mix (about 14k safety rows).
DEFAULT_QUOTAS: dict[str, int] = {"EHD": 10_000, "IHD": 3_000, "MHD": 1_000}

_SAFETY_NAMES = tuple(g.value for g in SAFETY_GROUPS)


class MixWarning(UserWarning):
    """A group had fewer rows than the mix asked for (or rows were left out on purpose)."""


@dataclass
class MixResult:
    """A mixed dataset and the account of how it was built.

    ``counts`` are the rows per group in ``records``; ``requested`` / ``available`` are per
    safety group (plus ``general``); ``notes`` explain every shortfall or exclusion.
    """

    records: list[Record]
    counts: dict[str, int]
    requested: dict[str, int]
    available: dict[str, int]
    notes: list[str] = field(default_factory=list)
    mode: str = ""

    def table(self) -> str:
        """A plain-text table: group, rows, share of the total, requested, available."""
        total = max(len(self.records), 1)
        lines = [f"{'group':<8} {'rows':>7} {'share':>7} {'requested':>10} {'available':>10}"]
        for group in sorted(self.counts, key=_group_order):
            n = self.counts[group]
            req = self.requested.get(group)
            lines.append(
                f"{group:<8} {n:>7} {n / total:>7.1%} {'-' if req is None else req:>10} "
                f"{self.available.get(group, 0):>10}"
            )
        lines.append(f"{'total':<8} {len(self.records):>7} {1:>7.1%}")
        return "\n".join(lines)


def _group_order(name: str) -> tuple[int, str]:
    order = {g.value: i for i, g in enumerate(Group)}
    return (order.get(name, len(order)), name)


def _round_half_up(x: float) -> int:
    # Python's round() rounds half to even; a mix size should not depend on that subtlety.
    return int(math.floor(x + 0.5))


def _rng(seed: int, tag: str) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, independent of PYTHONHASHSEED.
    return random.Random(f"{seed}:{tag}")


def _by_group(records: Sequence[Record], where: str) -> dict[str, list[Record]]:
    groups: dict[str, list[Record]] = {}
    for i, rec in enumerate(records):
        if "group" not in rec:
            raise ValueError(f"{where} record {i} (id={rec.get('id', '?')!r}) has no 'group' field")
        name = Group.parse(rec["group"]).value
        groups.setdefault(name, []).append(rec)
    return groups


def _draw(
    rows: list[Record], n: int, *, replacement: bool, rng: random.Random, group: str, notes: list[str]
) -> list[Record]:
    """``n`` rows of ``rows``; short groups are taken whole (or upsampled if ``replacement``)."""
    if n <= len(rows):
        return rng.sample(rows, n)
    if not replacement:
        msg = (
            f"{group}: requested {n} rows but only {len(rows)} available; took all {len(rows)} "
            f"(shortfall {n - len(rows)}; pass replacement=True to upsample)"
        )
        notes.append(msg)
        warnings.warn(msg, MixWarning, stacklevel=3)
        return rng.sample(rows, len(rows))
    if not rows:
        msg = f"{group}: requested {n} rows but none available; nothing to upsample"
        notes.append(msg)
        warnings.warn(msg, MixWarning, stacklevel=3)
        return []
    # Upsampling: every row once, the remainder drawn with replacement. Keeps the most
    # distinct rows a short group can offer.
    extra = rng.choices(rows, k=n - len(rows))
    msg = f"{group}: requested {n} rows, {len(rows)} available; upsampled with {n - len(rows)} repeats"
    notes.append(msg)
    warnings.warn(msg, MixWarning, stacklevel=3)
    return rng.sample(rows, len(rows)) + extra


def requested_counts(
    n_general: int,
    *,
    mode: MixMode,
    ratios: Mapping[str, float] | None = None,
    quotas: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Safety rows each group asks for under ``mode`` (``all`` and ``sorted`` have no request: empty dict)."""
    if mode == "ratio":
        ratios = dict(DEFAULT_RATIOS if ratios is None else ratios)
        out = {}
        for group, r in ratios.items():
            name = Group.parse(group).value
            if name not in _SAFETY_NAMES:
                raise ValueError(f"ratios: {group!r} is not a safety group {_SAFETY_NAMES}")
            if not r > 0:
                raise ValueError(f"ratios[{group!r}] must be > 0 (general rows per safety row), got {r}")
            out[name] = _round_half_up(n_general / r)
        return out
    if mode == "quota":
        quotas = dict(DEFAULT_QUOTAS if quotas is None else quotas)
        out = {}
        for group, q in quotas.items():
            name = Group.parse(group).value
            if name not in _SAFETY_NAMES:
                raise ValueError(f"quotas: {group!r} is not a safety group {_SAFETY_NAMES}")
            if int(q) != q or q < 0:
                raise ValueError(f"quotas[{group!r}] must be a non-negative integer, got {q}")
            out[name] = int(q)
        return out
    if mode in ("all", "sorted"):
        return {}
    raise ValueError(f"unknown mix mode {mode!r}; expected 'ratio', 'quota', 'all' or 'sorted'")


def mix(
    general: Sequence[Record],
    safety: Sequence[Record],
    *,
    mode: MixMode = "ratio",
    ratios: Mapping[str, float] | None = None,
    quotas: Mapping[str, int] | None = None,
    replacement: bool = False,
    seed: int = 0,
) -> MixResult:
    """Mix every general row with a stratified sample of the safety rows.

    Args:
        general: helpfulness records (all of them are used).
        safety: safety records with a ``group`` field (labelled or categorized upstream).
            Rows whose group is ``general`` (benign look-alikes the categorizer cleared) are
            not a safety group: ``ratio``/``quota``/``sorted`` leave them out with a note, ``all``
            keeps them.
        mode: ``ratio``, ``quota``, ``all`` or ``sorted`` (see the module docstring).
        ratios: general rows per ONE safety row of each group (default :data:`DEFAULT_RATIOS`).
        quotas: absolute rows per group (default :data:`DEFAULT_QUOTAS`).
        replacement: upsample a group that has fewer rows than requested (each row once, the
            rest drawn with replacement). Off by default: a short group is taken whole and the
            shortfall is reported in ``notes`` and as a :class:`MixWarning`.
        seed: the same seed gives the same rows in the same order.

    Returns:
        :class:`MixResult`; ``records`` is shuffled (deterministically) so that a consumer that
        does not shuffle still sees the groups interleaved.
    """
    notes: list[str] = []
    pools = _by_group(safety, "safety")
    requested = requested_counts(len(general), mode=mode, ratios=ratios, quotas=quotas)
    available = {name: len(pools.get(name, [])) for name in _SAFETY_NAMES}
    available[Group.GENERAL.value] = len(general)

    chosen: list[Record] = list(general)
    if mode == "all":
        for name in sorted(pools, key=_group_order):
            chosen.extend(pools[name])
    elif mode == "sorted":
        for name in sorted(pools, key=_group_order):
            if name == Group.GENERAL.value:
                notes.append(f"{len(pools[name])} safety rows labelled 'general' not mixed: mode 'sorted' takes the "
                             f"harmful groups {list(_SAFETY_NAMES)}")
            else:
                chosen.extend(pools[name])
    else:
        for name in sorted(requested, key=_group_order):
            rows = pools.get(name, [])
            chosen.extend(
                _draw(rows, requested[name], replacement=replacement, rng=_rng(seed, name), group=name, notes=notes)
            )
        left_out = {k: len(v) for k, v in pools.items() if k not in requested}
        for name, n in sorted(left_out.items(), key=lambda kv: _group_order(kv[0])):
            what = "safety rows labelled 'general'" if name == Group.GENERAL.value else f"{name} rows"
            notes.append(f"{n} {what} not mixed: mode {mode!r} asks for groups {sorted(requested)}")
    requested_all = dict(requested)
    requested_all[Group.GENERAL.value] = len(general)
    _rng(seed, "order").shuffle(chosen)
    counts = dict(Counter(Group.parse(r["group"]).value for r in chosen))
    return MixResult(chosen, counts, requested_all, available, notes, mode=mode)


def naive_base(n_general: int, ratios: Mapping[str, float] | None = None) -> int:
    """Safety rows the default FDC ratio mix would use for ``n_general`` general rows.

    The naive arm at ``scale=1`` therefore spends the same safety budget as FDC, unsorted;
    ``scale > 1`` is the "more safety data" arm the paper compares against (20k and 60k).
    """
    return sum(requested_counts(n_general, mode="ratio", ratios=ratios).values())


def naive(
    general: Sequence[Record],
    safety: Sequence[Record],
    scale: float = 1.0,
    seed: int = 0,
    *,
    base: int | None = None,
    replacement: bool = False,
) -> MixResult:
    """All general rows plus ``round(scale * base)`` safety rows drawn uniformly, groups ignored.

    ``base`` defaults to :func:`naive_base` (the FDC ratio mix's safety budget). Safety rows keep
    whatever ``group`` they carry, so per-group metrics still work, but the draw ignores it (the
    pool may include benign look-alikes, as unsorted safety data does).
    """
    if scale < 0:
        raise ValueError(f"scale must be >= 0, got {scale}")
    notes: list[str] = []
    base = naive_base(len(general)) if base is None else int(base)
    n = _round_half_up(scale * base)
    drawn = _draw(list(safety), n, replacement=replacement, rng=_rng(seed, "naive"), group="safety", notes=notes)
    chosen = list(general) + drawn
    _rng(seed, "order").shuffle(chosen)
    # Unsorted rows may carry no label at all: count them as such rather than guess.
    counts = dict(Counter(str(r.get("group") or "unlabelled") for r in chosen))
    requested = {"safety": n, Group.GENERAL.value: len(general)}
    available = {"safety": len(safety), Group.GENERAL.value: len(general)}
    return MixResult(chosen, counts, requested, available, notes, mode="naive")

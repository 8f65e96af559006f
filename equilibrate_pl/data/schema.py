"""Record kinds and FDC group labels shared by every stage.

A record is a plain dict after loading (datasets and DataLoaders move dicts around cheaply);
these dataclasses document the fields and do the validation that loaders report per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Union

# A message list in the usual chat format: [{"role": "user", "content": "..."}, ...]
Messages = list[dict[str, str]]
PromptLike = Union[str, Messages]


class Group(str, Enum):
    """FDC groups (METHOD.md section 2). `general` covers helpfulness data and benign look-alikes."""

    EHD = "EHD"  # explicit harmful data: risky terms, not necessarily malicious intent
    IHD = "IHD"  # implicit harmful data: harmful intent without explicit terms
    MHD = "MHD"  # mixed: both
    GENERAL = "general"

    @classmethod
    def parse(cls, value: str) -> "Group":
        """Case-insensitive parse of a canonical group name; raises ValueError on anything else."""
        for g in cls:
            if str(value).strip().lower() == g.value.lower():
                return g
        raise ValueError(f"unknown group {value!r}; expected one of {[g.value for g in cls]}")


SAFETY_GROUPS: tuple[Group, ...] = (Group.EHD, Group.IHD, Group.MHD)
GROUP_NAMES: tuple[str, ...] = tuple(g.value for g in Group)

# Labels of the FDC BeaverTails release (the paper authors' relabelling) that mean "no FDC group".
BEAVERTAILS_GROUP_LABELS: dict[str, str] = {"no risk": "general", "other": "general"}

# Label of a token no loss or log-prob reads (prompt, padding): PyTorch's cross-entropy default.
IGNORE_INDEX = -100


@dataclass
class PromptRecord:
    """A prompt for rollouts, evaluation or categorization."""

    id: str
    prompt: PromptLike
    group: str = Group.GENERAL.value
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreferenceRecord:
    """A preference pair. `chosen`/`rejected` are the final assistant turns only."""

    prompt: PromptLike
    chosen: str
    rejected: str
    group: str = Group.GENERAL.value
    id: str = ""
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class SFTRecord:
    """A supervised example: the loss covers `response` only."""

    prompt: PromptLike
    response: str
    group: str = Group.GENERAL.value
    id: str = ""
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


RECORD_KINDS: dict[str, type] = {"prompt": PromptRecord, "preference": PreferenceRecord, "sft": SFTRecord}
# Fields each kind must have (after column mapping); the rest have defaults.
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt",),
    "preference": ("prompt", "chosen", "rejected"),
    "sft": ("prompt", "response"),
}

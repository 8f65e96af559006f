"""Record kinds, FDC group labels and the label convention shared by every stage."""

from __future__ import annotations

from enum import Enum
from typing import Union

# A message list in the usual chat format: [{"role": "user", "content": "..."}, ...]
Messages = list[dict[str, str]]
PromptLike = Union[str, Messages]


class Group(str, Enum):
    """FDC groups (docs/METHOD.md section 2). `general` covers helpfulness data and benign look-alikes."""

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


# A record is a plain dict (datasets and DataLoaders move dicts around cheaply) with exactly the
# fields of its kind; ``loaders.load_records`` builds and checks them row by row and keeps every
# other column of a source in ``meta``. ``prompt`` is a string or a chat message list; ``chosen`` /
# ``rejected`` / ``response`` are the final assistant turn only; ``group`` is a name from
# GROUP_NAMES (or None before categorization).
# Optional per-token values of a preference pair's responses (ADPO's ``ama.token_signal: field``);
# a preference record may carry them besides RECORD_FIELDS.
SIGNAL_FIELDS: tuple[str, ...] = ("chosen_token_signal", "rejected_token_signal")
# Optional safety labels of a preference pair (the cost model's data, docs/DATA.md): whether each
# response is unsafe (booleans, given together), and optionally which response is the safer one
# ("chosen" | "rejected") when the labels alone do not order the pair.
SAFETY_LABEL_FIELDS: tuple[str, ...] = ("chosen_unsafe", "rejected_unsafe")
SAFETY_FIELDS: tuple[str, ...] = (*SAFETY_LABEL_FIELDS, "safer_response")
RECORD_FIELDS: dict[str, tuple[str, ...]] = {
    "prompt": ("id", "prompt", "group", "source", "meta"),
    "preference": ("id", "prompt", "chosen", "rejected", "group", "source", "meta"),
    "sft": ("id", "prompt", "response", "group", "source", "meta"),
}
# Fields a source must provide for each kind (after column mapping); the rest have defaults.
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt",),
    "preference": ("prompt", "chosen", "rejected"),
    "sft": ("prompt", "response"),
}

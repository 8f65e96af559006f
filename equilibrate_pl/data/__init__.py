"""Data: records, loaders, FDC categorization and mixing, the built-in world, batches.

Importing this package is cheap: the public names below are loaded on first use (the data module
pulls in Lightning, the tokenizer kit pulls in transformers).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> submodule that defines it
_LAZY: dict[str, str] = {
    "SafetyDataModule": "datamodule",
    "mix": "mixing",
    "naive": "mixing",
    "MixResult": "mixing",
    "DEFAULT_RATIOS": "mixing",
    "DEFAULT_QUOTAS": "mixing",
    "ResumableSampler": "sampler",
    "ResumableDataLoader": "sampler",
    "SFTCollator": "collate",
    "PreferenceCollator": "collate",
    "PromptCollator": "collate",
    "EncodedDataset": "collate",
    "build_collator": "collate",
    "DataSource": "loaders",
    "DataError": "loaders",
    "load_records": "loaders",
    "build_categorizer": "fdc",
    "build_world": "world",
    "load_tokenizer": "tokenizer",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from equilibrate_pl.data.collate import (
        EncodedDataset,
        PreferenceCollator,
        PromptCollator,
        SFTCollator,
        build_collator,
    )
    from equilibrate_pl.data.datamodule import SafetyDataModule
    from equilibrate_pl.data.fdc import build_categorizer
    from equilibrate_pl.data.loaders import DataError, DataSource, load_records
    from equilibrate_pl.data.mixing import DEFAULT_QUOTAS, DEFAULT_RATIOS, MixResult, mix, naive
    from equilibrate_pl.data.sampler import ResumableDataLoader, ResumableSampler
    from equilibrate_pl.data.tokenizer import load_tokenizer
    from equilibrate_pl.data.world import build_world


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

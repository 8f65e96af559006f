"""Per-row values of DPO's frozen side (reference log-probs, dense reward signals), computed once.

With ``PreferenceModule(precompute_reference=True)`` one sequential pass over the train and
validation data fills a :class:`ReferenceCache` before the first step; the training steps then read
the reference side from it instead of running the reference (and reward) model. The file is keyed by
:func:`fingerprint` of what the values depend on, so a resumed run, or a second run on the same
data and models, computes nothing.

A row is found by its split and dataset index and checked against a hash of its tokens: a changed
dataset under the same index is recomputed, never served stale values.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from equilibrate_pl.files import atomic_torch_save

log = logging.getLogger(__name__)

Pairs = dict[str, torch.Tensor]


def fingerprint(info: Mapping[str, Any]) -> str:
    """16 hex digits naming a cache file: a hash of ``info`` (the models, dtypes, signal kind, ...)
    together with the cache format version."""
    payload = json.dumps({"version": ReferenceCache.VERSION, **info}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def weights_id(name_or_path: str | None) -> Any:
    """What identifies a model's weights for :func:`fingerprint`: for a local directory its weight
    files' names, sizes and times (they change when it is retrained), else the name itself."""
    from equilibrate_pl.models import resolve_model_path

    if name_or_path is None:
        return None
    path = Path(resolve_model_path(name_or_path))
    if path.is_dir():
        return [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in sorted(path.glob("*.safetensors"))]
    return str(name_or_path)


class ReferenceCache:
    """Values in the stacked-pairs layout (2B, L-1), stored per pair without padding.

    Args:
        names: the values each row holds (``"reference"``; ``"signal"`` too for a dense-reward ADPO).
        path: the file :meth:`load` reads and :meth:`save` writes.
    """

    VERSION = 2

    def __init__(self, names: Sequence[str], path: str | Path | None = None) -> None:
        self.names = tuple(names)
        self.path = Path(path) if path is not None else None
        self.rows: dict[str, dict[str, Any]] = {}

    def load(self, path: str | Path | None = None) -> int:
        """Add the rows of the file (if it exists and has this format); returns how many."""
        path = Path(path) if path is not None else self.path
        if path is None or not path.is_file():
            return 0
        data = torch.load(path, weights_only=True, map_location="cpu")
        if data.get("version") != self.VERSION:
            return 0
        self.rows.update(data["rows"])
        log.info("reference cache: %d rows from %s", len(data["rows"]), path)
        return len(data["rows"])

    def save(self, path: str | Path | None = None) -> None:
        path = Path(path) if path is not None else self.path
        if path is None:
            raise ValueError("ReferenceCache.save needs a path")
        atomic_torch_save({"version": self.VERSION, "rows": self.rows}, path)

    @staticmethod
    def _row_keys(batch: Mapping[str, Any], pairs: Pairs, split: str) -> list[tuple[str, str, int, int]]:
        """Per pair: (key, token hash, chosen length, rejected length)."""
        b = batch["index"].shape[0]
        ids, attn = pairs["input_ids"].cpu(), pairs["attention_mask"].cpu()
        lengths = attn.sum(-1).tolist()
        rows = []
        for i in range(b):
            h = hashlib.blake2b(digest_size=12)
            for r in (i, b + i):
                h.update(ids[r, : lengths[r]].numpy().astype(np.int64).tobytes())
                h.update(b"|")
            rows.append((f"{split}/{int(batch['index'][i])}", h.hexdigest(), lengths[i], lengths[b + i]))
        return rows

    def lookup(self, batch: Mapping[str, Any], pairs: Pairs, split: str) -> dict[str, torch.Tensor] | None:
        """``{name: (2B, L-1) CPU tensor}`` when every pair of the batch is cached, else ``None``."""
        entries = []
        for key, digest, _, _ in self._row_keys(batch, pairs, split):
            entry = self.rows.get(key)
            if entry is None or entry["hash"] != digest or any(f"{n}_chosen" not in entry for n in self.names):
                return None
            entries.append(entry)
        b, width = len(entries), pairs["input_ids"].shape[1] - 1
        out = {name: torch.zeros(2 * b, width) for name in self.names}
        for i, entry in enumerate(entries):
            for name, value in out.items():
                chosen, rejected = entry[f"{name}_chosen"], entry[f"{name}_rejected"]
                value[i, : chosen.numel()] = chosen
                value[b + i, : rejected.numel()] = rejected
        return out

    def store(self, batch: Mapping[str, Any], pairs: Pairs, split: str, values: Mapping[str, torch.Tensor]) -> None:
        """Keep ``values`` ((2B, L-1) each, one per name) of every pair of the batch."""
        b = batch["index"].shape[0]
        for i, (key, digest, len_c, len_r) in enumerate(self._row_keys(batch, pairs, split)):
            # A row of n real tokens has n-1 log-prob positions; padding beyond is zero by construction.
            entry: dict[str, Any] = {"hash": digest}
            for name in self.names:
                entry[f"{name}_chosen"] = values[name][i, : len_c - 1].float().cpu().clone()
                entry[f"{name}_rejected"] = values[name][b + i, : len_r - 1].float().cpu().clone()
            self.rows[key] = entry

    @torch.no_grad()
    def fill(
        self, loaders: Mapping[str, Iterable[dict[str, Any]]], prepare: Callable[[dict[str, Any]], tuple[dict[str, Any], Pairs]],
        compute: Callable[[Pairs], Mapping[str, torch.Tensor]],
    ) -> int:
        """Compute and store every pair of ``{split: batches}`` not cached yet; returns how many were
        computed. ``prepare`` maps a batch to ``(batch on the device, stacked pairs)``."""
        computed = 0
        for split, loader in loaders.items():
            for batch in loader:
                batch, pairs = prepare(batch)
                if self.lookup(batch, pairs, split) is None:
                    self.store(batch, pairs, split, compute(pairs))
                    computed += batch["index"].shape[0]
        return computed

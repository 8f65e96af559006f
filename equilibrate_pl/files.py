"""Files written whole or not at all.

Every writer here goes through :func:`atomic_path`: the content goes to a temporary file in the
target's directory (so the final rename never crosses a file system), which is fsynced and moved
over the target with ``os.replace``; then the directory entry is fsynced too (a rename is durable
only once its directory is on disk). On any error the temporary file is removed and the previous
target stays as it was. A crash mid-write therefore leaves the old file (at worst a stray hidden
``.tmp`` file beside it), never a truncated one that a later run would choke on.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

PathLike = str | os.PathLike[str]


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yields a temporary path to write ``path``'s new content to; it replaces ``path`` when the
    block ends without an error. The temporary name ends with ``path``'s suffix, so writers that
    pick a format by suffix (``savefig``) still do."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        yield tmp
        _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent, os.O_RDONLY)


def _fsync(path: Path, flags: int) -> None:
    # Not every platform can open (or fsync) a directory (Windows); the rename is done either way.
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (one trailing newline) atomically; tensors as lists, other values JSON
    does not know (paths, dates) as strings."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=_json_value) + "\n")


def _json_value(value: Any) -> Any:
    tolist = getattr(value, "tolist", None)  # tensors, numpy arrays
    return tolist() if callable(tolist) else str(value)


def atomic_write_jsonl(path: PathLike, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write ``rows`` as JSON lines atomically; returns how many. Values JSON does not know (dates or
    decimals in a parquet row's meta) are written as strings."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            n += 1
    return n


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (checkpoints, caches)."""
    import torch  # here: the JSON and text writers serve torch-free data code

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)

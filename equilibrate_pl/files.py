"""Files written whole or not at all.

Every writer here goes through :func:`atomic_path`: the content goes to a temporary file in the
target's directory (so the final rename never crosses a file system), which is fsynced and moved
over the target with ``os.replace``; then the directory entry is fsynced too (a rename is durable
only once its directory is on disk). On any error the temporary file is removed and the previous
target stays as it was.

A process killed mid-write cannot remove its temporary file. Temporary names carry the writer's
pid (``.<target>.<pid>-<hex>.tmp<suffix>``), and the next write of the same target removes the
ones whose process is gone (:func:`remove_stale_temporaries`), so they do not pile up beside a
checkpoint rewritten every N steps. Files are created by ``open()``, so they get the permissions
your umask gives (not ``mkstemp``'s 0600). JSON is written as JSON: NaN and infinity become
``null`` (Python's ``json`` would write the invalid bare tokens ``NaN`` / ``Infinity``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

PathLike = str | os.PathLike[str]

__all__ = ["atomic_path", "atomic_write_text", "atomic_write_json", "atomic_write_jsonl", "atomic_torch_save",
           "dumps_json", "json_safe", "fsync_directory", "remove_stale_temporaries", "temporary_path"]


def temporary_path(path: PathLike) -> Path:
    """A fresh temporary path beside ``path``; it keeps ``path``'s suffix, so writers that pick a
    format by suffix (``savefig``) still do."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def remove_stale_temporaries(path: PathLike) -> list[Path]:
    """Delete temporaries of ``path`` left by writers that died; returns what was removed.

    Only names :func:`temporary_path` makes are touched, and only when their process is gone: a
    concurrent writer of the same target on this machine keeps its file.
    """
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}.") + r"(\d+)-[0-9a-f]{8}\.tmp" + re.escape(path.suffix))
    removed: list[Path] = []
    try:
        candidates = list(path.parent.iterdir())
    except OSError:
        return removed
    for candidate in candidates:
        match = pattern.fullmatch(candidate.name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        try:
            if candidate.is_dir() and not candidate.is_symlink():
                shutil.rmtree(candidate)
            else:
                candidate.unlink()
            removed.append(candidate)
        except OSError:
            pass
    return removed


def fsync_directory(directory: PathLike) -> None:
    """Make a rename in ``directory`` durable (POSIX); a no-op where directories cannot be opened."""
    _fsync(Path(directory))


def _fsync(path: Path) -> None:
    # Not every platform can open (or fsync) a directory (Windows); the rename is done either way.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yields a temporary path to write ``path``'s new content to; it replaces ``path`` when the
    block ends without an error (and is removed when it does not)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def json_safe(value: Any) -> Any:
    """``value`` as JSON can hold it: NaN / infinity -> ``None``, tensors and arrays -> lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    tolist = getattr(value, "tolist", None)  # tensors, numpy arrays and scalars
    if callable(tolist) and not isinstance(value, (str, bytes)):
        return json_safe(tolist())
    return value


def dumps_json(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`json_safe` ``(value)``, refusing anything else that is not JSON; other
    values JSON does not know (paths, dates) are written as strings."""
    kwargs.setdefault("default", str)
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def atomic_write_json(path: PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (one trailing newline) atomically."""
    return atomic_write_text(path, dumps_json(obj, indent=indent, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: PathLike, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write ``rows`` as JSON lines atomically; returns how many."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(dumps_json(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def append_lines(path: PathLike, text: str) -> None:
    """Append ``text`` to ``path`` and make it durable (flush + fsync): a log a killed process may
    leave with a torn last line, which :func:`read_jsonl_prefix` drops."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def append_jsonl(path: PathLike, rows: Iterable[Mapping[str, Any]]) -> int:
    """Append ``rows`` as JSON lines, durably (:func:`append_lines`); returns how many."""
    lines = [dumps_json(row, ensure_ascii=False) + "\n" for row in rows]
    if lines:
        append_lines(path, "".join(lines))
    return len(lines)


def read_jsonl_prefix(path: PathLike) -> list[dict[str, Any]]:
    """The complete JSON lines of an append-only log, up to the first one that does not parse (the
    torn last line of a killed write); ``[]`` when the file does not exist."""
    out = []
    path = Path(path)
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


def repair_jsonl_log(path: PathLike) -> list[dict[str, Any]]:
    """:func:`read_jsonl_prefix`, and when a torn tail follows the complete lines, rewrite the file
    (atomically) without it, so the next append starts on a line of its own."""
    rows = read_jsonl_prefix(path)
    path = Path(path)
    if path.is_file():
        kept = "".join(dumps_json(row, ensure_ascii=False) + "\n" for row in rows)
        if path.read_text(encoding="utf-8") != kept:
            atomic_write_text(path, kept)
    return rows


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (checkpoints, caches)."""
    import torch  # here: the JSON and text writers serve torch-free data code

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)

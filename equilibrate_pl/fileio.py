"""Writing files so that a crash or a kill never leaves a half-written one, and JSON that is JSON.

Every file the package writes (checkpoints, exports, data files, reports) goes through
:func:`atomic_write`: the bytes go to a temporary file beside the target, are flushed to disk, and
the temporary replaces the target in one ``os.replace``. Readers see the old file or the new one.

Temporary names are ``.<target>.<pid>.<random>.tmp``. A process killed mid-write leaves its
temporary behind; the next write of the same target removes such leftovers of processes that are no
longer running (:func:`remove_stale_temporaries`), so they do not pile up beside a checkpoint that
is rewritten every N steps.

Files are created with the permissions ``open()`` would give (``0o666`` less the umask), not the
``0o600`` of :func:`tempfile.mkstemp`.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

__all__ = ["atomic_write", "atomic_write_text", "fsync_directory", "json_safe", "dumps_json", "remove_stale_temporaries",
           "temporary_name"]

_SUFFIX = ".tmp"


def temporary_name(target: Path) -> Path:
    """A fresh temporary path beside ``target`` (same file system, so the final rename is atomic)."""
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}{_SUFFIX}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Delete temporaries of ``target`` left by processes that died mid-write; returns what was removed.

    Only names this module creates are touched (``.<target>.<pid>.<hex>.tmp``), and only when that
    process is gone: a concurrent writer of the same target on this machine keeps its file.
    """
    removed = []
    prefix = f".{target.name}."
    try:
        candidates = list(target.parent.iterdir())
    except OSError:
        return removed
    for path in candidates:
        name = path.name
        if not (name.startswith(prefix) and name.endswith(_SUFFIX)):
            continue
        pid, _, token = name[len(prefix) : -len(_SUFFIX)].partition(".")
        if not (pid.isdigit() and len(token) == 8) or _pid_alive(int(pid)):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file for ``path``; on a clean exit it is fsynced and renamed onto ``path``.

    On an exception the temporary is removed and ``path`` is untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = temporary_name(target)
    # O_EXCL: never follow or reuse an existing name; 0o666: the umask decides, as for open().
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, mode, encoding=encoding, **({"newline": ""} if "b" not in mode else {})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(target.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return Path(path)


def json_safe(value: Any) -> Any:
    """``value`` with every NaN / infinity replaced by ``None`` (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps_json(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` that writes ``null`` for NaN / infinity instead of the invalid bare ``NaN`` token."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)

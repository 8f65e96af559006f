"""Files the other commands write (issue 12, item 9): valid JSON (``null``, never a bare ``NaN``) and
the permissions the umask gives (not ``mkstemp``'s 0600)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def _umask_mode() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def test_world_files_get_the_umask_permissions(tmp_path: Path) -> None:
    from equilibrate_pl.data.world import build_world

    written = build_world(size="tiny").to_files(tmp_path)
    assert written and all(p.stat().st_mode & 0o777 == _umask_mode() for p in written.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written.values())


def test_quickstart_metrics_json_has_no_bare_nan(tmp_path: Path) -> None:
    from equilibrate_pl.quickstart import _write_json_atomic

    path = tmp_path / "metrics.json"
    _write_json_atomic(path, {"metrics": {"before": {"win_rate": math.nan, "safety_rate": 0.5}}})

    def refuse(name: str) -> None:
        raise ValueError(f"bare {name} is not JSON")

    assert json.loads(path.read_text(), parse_constant=refuse) == {"metrics": {"before": {"win_rate": None, "safety_rate": 0.5}}}
    assert path.stat().st_mode & 0o777 == _umask_mode()

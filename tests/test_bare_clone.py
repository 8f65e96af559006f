"""A bare clone passes its own data and eval tests: no ../shared/data beside it, no $EQUILIBRATE_DATA,
an empty download folder, offline. The tests that need a public dataset skip with a reason that names
the download command; everything else passes. (The clone holds the committed state, HEAD.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The test files that read real data (through the `shared_data` fixture or a suite name).
REAL_DATA_TESTS = ["tests/data/test_catalog.py", "tests/data/test_loaders.py", "tests/data/test_fdc.py",
                   "tests/eval/test_suites.py", "tests/eval/test_refusal.py", "tests/test_cli_categorize.py"]


def test_bare_clone_runs_the_data_and_eval_tests_with_skips(tmp_path: Path) -> None:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: nothing to clone")
    clone = tmp_path / "repo"  # tmp_path/shared does not exist: nothing beside the clone
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k not in ("EQUILIBRATE_DATA", "PYTEST_ADDOPTS")}
    env.update(PYTHONPATH=str(clone), EQUILIBRATE_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *REAL_DATA_TESTS],
                         cwd=clone, env=env, text=True, capture_output=True, timeout=1200)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    assert " passed" in out and " skipped" in out, out[-2000:]
    skips = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    assert skips and all("equilibrate data download" in line for line in skips), skips[:3]
    assert str(REPO) not in out  # the clone's own code ran, not this checkout's

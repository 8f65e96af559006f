"""Fixtures for the model-kit tests: one tiny model directory per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers.utils import logging as hf_logging

from equilibrate_pl.data.tokenizer import tiny_tokenizer
from equilibrate_pl.models import tiny_model_dir


@pytest.fixture(scope="session", autouse=True)
def _quiet_transformers():
    # The "score.* MISSING" load report is expected for every new scalar head; keep test logs readable.
    hf_logging.set_verbosity_error()


@pytest.fixture(autouse=True)
def _session_cache(equilibrate_cache: Path) -> Path:
    # Every test here may resolve "builtin:tiny": build it in the session cache, never in ~/.cache.
    return equilibrate_cache


@pytest.fixture(scope="session")
def tiny_dir(equilibrate_cache: Path) -> Path:
    return tiny_model_dir(equilibrate_cache, seed=0)


@pytest.fixture(scope="session")
def tiny_tok(equilibrate_cache: Path):
    return tiny_tokenizer(equilibrate_cache, seed=0)

"""Shared fixtures. Everything here runs offline on CPU."""

from __future__ import annotations

import os
from pathlib import Path

# Set before transformers/datasets are imported anywhere in the test session.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# The suite's models are tiny: intra-op threads only add overhead, and the multi-process tests
# (ddp_spawn, torchrun) would oversubscribe 2 cores; children inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Also set here in case a plugin imported torch before the variable above was read.
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data`: XSTest, hh-rlhf harmless pairs and the FDC-labelled BeaverTails prompts."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"test data not found at {SHARED_DATA}; the repo must sit beside shared/")
    return SHARED_DATA


@pytest.fixture(scope="session")
def equilibrate_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache directory per test session for the built-in tiny tokenizer and model."""
    path = tmp_path_factory.mktemp("equilibrate_cache")
    os.environ["EQUILIBRATE_CACHE"] = str(path)
    return path

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

from equilibrate_pl.data import catalog  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
# Taken before any fixture points $EQUILIBRATE_CACHE (and with it the download folder) at a temp dir.
DATA_DIRS = catalog.data_dirs()


class RealData:
    """``shared_data / "xstest" / "xstest_prompts.csv"``: that file of a public dataset, wherever
    ``equilibrate_pl.data.catalog`` finds it ($EQUILIBRATE_DATA, the download folder, ../shared/data
    beside the repository). When it is nowhere the test is skipped with a one-line reason saying how
    to get it; nothing is downloaded (tests are offline)."""

    def __truediv__(self, name: str) -> "_Dataset":
        return _Dataset(name)


class _Dataset:
    def __init__(self, name: str) -> None:
        self.name = name

    def __truediv__(self, file: str) -> Path:
        path = catalog.locate(self.name, file, DATA_DIRS)
        if path is None:
            pytest.skip(f"real data {self.name}/{file} not found; get it with {catalog.how_to_get(self.name)}")
        return path


@pytest.fixture(scope="session")
def shared_data() -> RealData:
    """The public datasets (XSTest, hh-rlhf harmless pairs, the FDC-labelled BeaverTails prompts);
    tests that need one skip when it is not reachable (a bare clone)."""
    return RealData()


@pytest.fixture(scope="session")
def equilibrate_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache directory per test session for the built-in tiny tokenizer and model."""
    path = tmp_path_factory.mktemp("equilibrate_cache")
    os.environ["EQUILIBRATE_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def implicit_model_dir(equilibrate_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A frozen pi* for ADPO's ``implicit`` token signal: the built-in tiny model with fixed weight
    noise, saved with its tokenizer (its log-ratio to the tiny model is a non-trivial signal)."""
    from equilibrate_pl.models import load_causal_lm

    model, tokenizer = load_causal_lm("builtin:tiny")
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    path = tmp_path_factory.mktemp("implicit_model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)

"""The package's layout rules, checked on what importing each layer actually loads (one fresh
interpreter per layer: if the layer together loads none of it, none of its modules does)."""

from __future__ import annotations

import json
import subprocess
import sys

ALGORITHMS = ["ama", "cost", "dpo", "kl", "lagrangian", "logprobs", "ppo", "prefix_sharing", "rewards"]
PURE_DATA = ["contrastive", "fdc", "fdc_lexicon", "fdc_mhd", "fdc_report", "loaders", "mixing", "schema", "world"]
MODEL_CODE = ("equilibrate_pl.modules", "equilibrate_pl.models")


def loaded_after(*modules: str) -> set[str]:
    """The modules a fresh interpreter has loaded after importing ``modules``."""
    code = "import sys, json\n" + "".join(f"import {m}\n" for m in modules) + "print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


def test_the_method_math_imports_no_lightning_and_no_model_code() -> None:
    loaded = loaded_after(*(f"equilibrate_pl.algorithms.{m}" for m in ALGORITHMS))
    assert not {m for m in loaded if m.split(".")[0] in ("lightning", "pytorch_lightning")}
    assert not {m for m in loaded if m.startswith(MODEL_CODE)}


def test_the_pure_data_code_imports_neither_torch_nor_model_code() -> None:
    loaded = loaded_after(*(f"equilibrate_pl.data.{m}" for m in PURE_DATA))
    assert "torch" not in loaded
    assert not {m for m in loaded if m.startswith(MODEL_CODE)}


def test_the_data_module_imports_no_model_code() -> None:
    assert not {m for m in loaded_after("equilibrate_pl.data.datamodule") if m.startswith(MODEL_CODE)}

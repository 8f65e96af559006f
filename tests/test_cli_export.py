"""`equilibrate export` and `fit --ckpt_path` on hostile inputs: nothing of the user's is deleted, and a
checkpoint cannot switch on remote code (issue 12, items 1 and 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning
import pytest
import torch

from equilibrate_pl.cli import main as cli
from tests.recipes import DPO_TINY_FROM_BASE

REPO = Path(__file__).resolve().parents[1]

# Runs when transformers imports the model directory's code, i.e. only with trust_remote_code=True.
EVIL_CONFIG = """
from pathlib import Path
Path({marker!r}).write_text("remote code ran")
from transformers import LlamaConfig
class EvilConfig(LlamaConfig):
    model_type = "llama"
"""


def _tiny_model_dir(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from equilibrate_pl.data.tokenizer import tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture()
def evil_model(tmp_path: Path, equilibrate_cache: Path) -> tuple[Path, Path]:
    """A loadable tiny Llama directory whose config also names remote code that writes a marker file."""
    path = _tiny_model_dir(tmp_path / "evil_model")
    marker = tmp_path / "REMOTE_CODE_RAN"
    (path / "configuration_evil.py").write_text(EVIL_CONFIG.format(marker=str(marker)))
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (path / "config.json").write_text(json.dumps(config))
    return path, marker


def _checkpoint(path: Path, model_path: str, trust_remote_code: bool) -> Path:
    """An SFT checkpoint as the trainer writes it, its stored model settings set as given."""
    from equilibrate_pl.modules import SFTModule
    from equilibrate_pl.modules.common import ModelSettings, module_class_path

    module = SFTModule(model=ModelSettings(model_path))
    hparams = dict(module.hparams)
    hparams["model"] = {**hparams["model"], "trust_remote_code": trust_remote_code}
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams, "equilibrate_module": module_class_path(module),
                "pytorch-lightning_version": lightning.__version__, "global_step": 0, "epoch": 0}, path)
    return path


@pytest.fixture()
def tiny_ckpt(tmp_path: Path, equilibrate_cache: Path) -> Path:
    return _checkpoint(tmp_path / "tiny.ckpt", "builtin:tiny", False)


def _export(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()  # only this command's output
    code = cli(["export", *args])
    return code, capsys.readouterr().err


def test_export_refuses_a_directory_it_did_not_write(tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mine = tmp_path / "my_documents"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    code, err = _export(["--ckpt", str(tiny_ckpt), "--output", str(mine)], capsys)
    assert code != 0
    assert (mine / "thesis.tex").read_text() == "years of work" and len(list(mine.iterdir())) == 1
    assert len(err.strip().splitlines()) == 1 and "not written by equilibrate export" in err


def test_export_refuses_the_current_directory(tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep me")
    monkeypatch.chdir(work)
    code, err = _export(["--ckpt", str(tiny_ckpt), "--output", "."], capsys)
    assert code != 0 and (work / "notes.txt").read_text() == "keep me"
    assert len(err.strip().splitlines()) == 1


def test_export_refuses_a_file(tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "model.bin"
    target.write_bytes(b"not a directory")
    code, err = _export(["--ckpt", str(tiny_ckpt), "--output", str(target)], capsys)
    assert code != 0 and target.read_bytes() == b"not a directory"
    assert "not a directory" in err and len(err.strip().splitlines()) == 1


def test_export_replaces_its_own_export_and_fills_an_empty_directory(tiny_ckpt: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "export"
    out.mkdir()  # an empty directory holds nothing to lose
    assert _export(["--ckpt", str(tiny_ckpt), "--output", str(out)], capsys)[0] == 0
    assert (out / "model.safetensors").is_file() and (out / "equilibrate_export.json").is_file()
    (out / "stale.txt").write_text("from the previous export")
    assert _export(["--ckpt", str(tiny_ckpt), "--output", str(out)], capsys)[0] == 0  # ours: replaced whole
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]  # no temporary left beside it


def test_export_does_not_take_trust_remote_code_from_the_checkpoint(evil_model: tuple[Path, Path], tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    model_dir, marker = evil_model
    ckpt = _checkpoint(tmp_path / "crafted.ckpt", str(model_dir), trust_remote_code=True)
    code, err = _export(["--ckpt", str(ckpt), "--output", str(tmp_path / "out")], capsys)
    assert not marker.exists(), "a checkpoint switched on trust_remote_code"
    assert code == 0, err  # the model itself loads without its remote code (a known architecture)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_export_trust_remote_code_needs_the_paths_on_the_command_line(evil_model: tuple[Path, Path], tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    model_dir, marker = evil_model
    ckpt = _checkpoint(tmp_path / "crafted.ckpt", str(model_dir), trust_remote_code=False)
    code, err = _export(["--ckpt", str(ckpt), "--output", str(tmp_path / "out"), "--trust-remote-code"], capsys)
    assert code != 0 and not marker.exists()
    assert "--model-path model=" in err and len(err.strip().splitlines()) == 1
    # Named by the user, the code is the user's choice and runs (this one then fails: its config class
    # has no model class, reported in one line).
    code, err = _export(["--ckpt", str(ckpt), "--output", str(tmp_path / "out"), "--trust-remote-code",
                         "--model-path", f"model={model_dir}"], capsys)
    assert marker.exists()
    assert code != 0 and len(err.strip().splitlines()) == 1


def test_fit_ckpt_path_does_not_take_code_settings_from_the_checkpoint(evil_model: tuple[Path, Path], tmp_path: Path,
                                                                       equilibrate_cache: Path) -> None:
    model_dir, marker = evil_model
    from equilibrate_pl.modules import PreferenceModule
    from equilibrate_pl.modules.common import module_class_path

    crafted = tmp_path / "last.ckpt"
    hparams = {"model": {"name_or_path": str(model_dir), "trust_remote_code": True}, "beta": 0.2,
               "_class_path": "equilibrate_pl.modules.PreferenceModule", "_instantiator": "lightning.pytorch.cli.instantiate_module"}
    torch.save({"hyper_parameters": hparams, "state_dict": {}, "equilibrate_module": module_class_path(PreferenceModule),
                "pytorch-lightning_version": lightning.__version__}, crafted)
    env = {**os.environ, "EQUILIBRATE_CACHE": str(equilibrate_cache), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    run = subprocess.run([sys.executable, "-m", "equilibrate_pl.cli", "dpo", "fit", "--config", str(REPO / "configs" / "dpo" / "tiny.yaml"), *DPO_TINY_FROM_BASE,
                          "--trainer.max_steps", "1", "--ckpt_path", str(crafted)],
                         cwd=tmp_path, env=env, text=True, capture_output=True, timeout=600)
    assert not marker.exists(), "fit --ckpt_path let a checkpoint switch on trust_remote_code"
    assert "trust_remote_code" in run.stderr and "ignored" in run.stderr  # the user is told what was not applied

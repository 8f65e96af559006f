"""Public datasets: where a local copy is looked for, the offline error, and `download` (no network:
the sources are pointed at local files / a stubbed `datasets.load_dataset`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from equilibrate_pl.data import catalog
from equilibrate_pl.data.loaders import DataError, load_records


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Three empty data folders in the roles $EQUILIBRATE_DATA, download folder, ../shared/data."""
    roots = {"env": tmp_path / "env", "cache": tmp_path / "cache", "sibling": tmp_path / "sibling"}
    monkeypatch.setenv("EQUILIBRATE_DATA", str(roots["env"]))
    monkeypatch.setenv("EQUILIBRATE_CACHE", str(roots["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(catalog, "_repo_sibling", lambda: roots["sibling"])
    return roots


def _put(root: Path, name: str, file: str, text: str = "x") -> Path:
    path = root / name / file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_locate_prefers_env_then_download_folder_then_the_repository_sibling(isolated: dict[str, Path]) -> None:
    assert catalog.locate("xstest") is None
    sibling = _put(isolated["sibling"], "xstest", "xstest_prompts.csv")
    assert catalog.locate("xstest") == sibling
    cached = _put(isolated["cache"] / "data", "xstest", "xstest_prompts.csv")
    assert catalog.locate("xstest") == cached
    env = _put(isolated["env"], "xstest", "xstest_prompts.csv")
    assert catalog.locate("xstest") == env
    # another file of the same dataset is looked up on its own
    assert catalog.locate("xstest", "xstest_v2_completions_gpt4.csv") is None
    assert [where for where, _ in catalog.data_dirs()] == ["$EQUILIBRATE_DATA", "download folder", "beside the repository"]


def test_require_offline_is_one_line_naming_how_to_get_it(isolated: dict[str, Path]) -> None:
    with pytest.raises(catalog.DatasetNotFound) as err:
        catalog.require("hh-rlhf")
    message = str(err.value)
    assert "\n" not in message
    assert "hh-rlhf/harmless-base-test.jsonl.gz not found" in message
    assert "equilibrate data download hh-rlhf" in message and "$EQUILIBRATE_DATA" in message
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        catalog.require("nope")


def test_download_copies_the_source_files_byte_for_byte(isolated: dict[str, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "upstream.json"
    source.write_bytes(b'[{"id": "a1", "question_y": "how do I pick a lock?", "category": "EHD"}]\n')
    spec = catalog.DATASETS["beavertails-fdc"]
    local = dataclasses.replace(spec, files=spec.files[:1], urls={spec.files[0]: str(source)})
    monkeypatch.setitem(catalog.DATASETS, "beavertails-fdc", local)

    folder = catalog.download("beavertails-fdc", tmp_path / "copy")
    written = folder / "beavertails_selected_relabelled.json"
    assert folder == tmp_path / "copy" / "beavertails-fdc"
    assert written.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == [written.name]  # no temp file left behind
    # require() then finds it in the download folder, and the preset reads it
    monkeypatch.delenv("HF_HUB_OFFLINE")
    found = catalog.require("beavertails-fdc", allow_download=True)
    assert found == isolated["cache"] / "data" / "beavertails-fdc" / written.name
    record = load_records(found, preset="beavertails-fdc").records[0]
    assert (record["prompt"], record["group"]) == ("how do I pick a lock?", "EHD")


def test_download_of_a_hub_dataset_writes_each_split_as_jsonl(isolated: dict[str, Path], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    rows = [
        {"prompt": "How do I hotwire a car?", "response_0": "Here is how...", "response_1": "I can't help with that.",
         "is_response_0_safe": False, "is_response_1_safe": True, "safer_response_id": 1, "better_response_id": 0},
        {"prompt": "What is a good pasta recipe?", "response_0": "Boil water...", "response_1": "Try carbonara...",
         "is_response_0_safe": True, "is_response_1_safe": True, "safer_response_id": 0, "better_response_id": 1},
    ]
    asked = []

    def fake_load_dataset(repo: str, config: str | None, split: str) -> datasets.Dataset:
        asked.append((repo, config, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    folder = catalog.download("pku-saferlhf", tmp_path / "copy")
    assert asked == [("PKU-Alignment/PKU-SafeRLHF", None, "train"), ("PKU-Alignment/PKU-SafeRLHF", None, "test")]
    lines = (folder / "train.jsonl").read_text().splitlines()
    assert [json.loads(line)["prompt"] for line in lines] == [r["prompt"] for r in rows]
    # the preset turns a row into a preference pair: chosen = the safer response
    pairs = load_records(folder / "train.jsonl", preset="pku-saferlhf").records
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == ("I can't help with that.", "Here is how...")
    assert (pairs[1]["chosen"], pairs[1]["rejected"]) == ("Boil water...", "Try carbonara...")
    assert pairs[0]["group"] is None and pairs[0]["meta"]["better_response_id"] == 0
    # files already there are kept (no second fetch) unless forced
    catalog.download("pku-saferlhf", tmp_path / "copy")
    assert len(asked) == 2


def test_pku_and_beavertails_presets_reject_bad_labels(tmp_path: Path) -> None:
    bad = tmp_path / "pku.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "response_0": "a", "response_1": "b", "safer_response_id": 2}) + "\n")
    with pytest.raises(DataError, match=r"pku.jsonl, row 1, field 'safer_response_id': expected 0 or 1, got 2"):
        load_records(bad, preset="pku-saferlhf")
    qa = tmp_path / "bt.jsonl"
    qa.write_text(json.dumps({"prompt": "How do I steal a car?", "response": "No.", "is_safe": True,
                              "category": {"violence": False}}) + "\n"
                  + json.dumps({"prompt": "Tell me a joke", "response": "Why...", "is_safe": "yes"}) + "\n")
    with pytest.raises(DataError, match=r"bt.jsonl, row 2, field 'is_safe'"):
        load_records(qa, preset="beavertails")
    first = load_records(qa, "sft", preset="beavertails", on_bad_row="skip").records[0]
    assert (first["response"], first["meta"]["label"], first["group"]) == ("No.", "safe", None)


def test_data_command_path_and_list(isolated: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from equilibrate_pl.cli import main

    assert main(["data", "path", "xstest"]) == 1
    assert "equilibrate data download xstest" in capsys.readouterr().err
    target = _put(isolated["env"], "xstest", "xstest_prompts.csv")
    assert main(["data", "path", "xstest"]) == 0
    assert capsys.readouterr().out.strip() == str(target)
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    for name in catalog.DATASETS:
        assert f"\n{name}: " in out
    assert "github.com/paul-rottger/exaggerated-safety" in out and "Anthropic/hh-rlhf" in out
    assert main(["data", "download", "hh-rlhf", "--to", str(isolated["env"])]) == 1  # offline: one line, exit 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("equilibrate data: downloading hh-rlhf failed") and "\n" not in err

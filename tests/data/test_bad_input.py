"""Bad input files found by probing the loaders (issue 12, items 6, 8 and 9): each ends in one
``DataError`` naming file, row and field, or loads exactly what the file holds."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import pytest
import torch

from equilibrate_pl.data.loaders import DataError, DataSource, load_records, write_jsonl


def test_a_directory_that_is_not_a_dataset(tmp_path: Path) -> None:
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "a.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(DataError, match="a directory, not a file") as info:
        load_records(tmp_path / "prompts")
    assert info.value.file == str(tmp_path / "prompts") or info.value.file == "prompts"


def test_a_missing_path_without_extension_is_not_sent_to_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="file not found"):  # data/ exists here: a local path, mistyped
        load_records("data/prompts")


def test_a_hub_id_that_cannot_be_loaded_is_one_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="not a local file, and loading it as a Hugging Face hub dataset failed") as info:
        load_records("someone/no-such-dataset-here")
    assert "\n" not in str(info.value)


def test_csv_field_over_the_csv_module_limit(tmp_path: Path) -> None:
    long = "x" * 140_000
    (tmp_path / "big.csv").write_text(f"prompt,group\nshort,EHD\n{long},IHD\n")
    with pytest.raises(DataError, match="140000 characters, over the limit max_chars=20000") as info:
        load_records(tmp_path / "big.csv")
    assert (info.value.row, info.value.field) == (2, "prompt")
    res = load_records(tmp_path / "big.csv", max_chars=200_000)
    assert [len(r["prompt"]) for r in res.records] == [5, 140_000]


def test_duplicated_csv_header_names_the_column(tmp_path: Path) -> None:
    (tmp_path / "dup.csv").write_text("prompt,group,prompt\nfirst,EHD,second\n")
    with pytest.raises(DataError, match="appears twice in the header") as info:
        load_records(tmp_path / "dup.csv")
    assert info.value.field == "prompt"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
@pytest.mark.parametrize("name", ["p.csv", "p.jsonl", "p.json"])
def test_utf16_and_utf32_files_are_named(tmp_path: Path, encoding: str, name: str) -> None:
    text = {"p.csv": "prompt,group\nhello,EHD\n", "p.jsonl": '{"prompt": "hello"}\n', "p.json": '[{"prompt": "hello"}]'}[name]
    data = text.encode(encoding)
    if encoding == "utf-16-be":
        data = b"\xfe\xff" + data  # with its byte-order mark
    (tmp_path / name).write_bytes(data)
    with pytest.raises(DataError, match=f"encoded as {encoding.upper()[:6]}") as info:
        load_records(tmp_path / name)
    assert info.value.row is None and "UTF-8" in str(info.value)


def test_skip_mode_names_the_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lines = ['{"prompt": "a"}', '{"prompt": ""}', '{"prompt": "c"}', '{"prompt": ""}', '{"prompt": "e", "group": "x"}']
    (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        res = load_records(tmp_path / "s.jsonl", on_bad_row="skip")
    summary = res.summary()
    assert "rows 2, 4" in summary and "row 5" in summary
    assert "s.jsonl" in caplog.text and "rows 2, 4" in caplog.text


def test_many_skipped_rows_are_listed_with_a_bound(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text("".join('{"prompt": ""}\n' for _ in range(30)) + '{"prompt": "ok"}\n')
    summary = load_records(tmp_path / "m.jsonl", on_bad_row="skip").summary()
    assert "rows 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 and 20 more" in summary


def test_write_jsonl_writes_null_for_nan_and_honours_the_umask(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    write_jsonl([{"prompt": "a", "meta": {"score": math.nan, "big": math.inf}}], out)
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"prompt": "a", "meta": {"score": None, "big": None}}
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


# ---------------------------------------------------------------- per-token signal columns


def test_token_signal_columns_are_kept_for_preference_records(tmp_path: Path) -> None:
    rows = [{"prompt": "p", "chosen": "a b", "rejected": "c", "chosen_token_signal": [0.5, -1, 2],
             "rejected_token_signal": [1.0, 0.0]}]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rec = load_records(tmp_path / "s.jsonl", "preference").records[0]
    assert rec["chosen_token_signal"] == [0.5, -1.0, 2.0] and rec["rejected_token_signal"] == [1.0, 0.0]
    assert "chosen_token_signal" not in rec["meta"]


def test_token_signal_columns_in_csv_are_json_lists(tmp_path: Path) -> None:
    (tmp_path / "s.csv").write_text('prompt,chosen,rejected,chosen_token_signal,rejected_token_signal\np,a,b,"[1, 2]","[0.5]"\n')
    rec = load_records(tmp_path / "s.csv", "preference").records[0]
    assert (rec["chosen_token_signal"], rec["rejected_token_signal"]) == ([1.0, 2.0], [0.5])


@pytest.mark.parametrize("value, match", [
    ("[1, \"x\"]", "a list of numbers"), ([1, None], "a list of numbers"), ([], "empty"), ("nope", "a list of numbers"),
    ([1, float("nan")], "finite"),
])
def test_bad_token_signal_names_row_and_field(tmp_path: Path, value: object, match: str) -> None:
    row = {"prompt": "p", "chosen": "a", "rejected": "b", "rejected_token_signal": [1.0], "chosen_token_signal": value}
    (tmp_path / "s.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n' + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=match) as info:
        load_records(tmp_path / "s.jsonl", "preference")
    assert (info.value.row, info.value.field) == (2, "chosen_token_signal")


def test_a_source_can_require_a_group(tmp_path: Path) -> None:
    (tmp_path / "s.jsonl").write_text('{"prompt": "a", "group": "EHD"}\n{"prompt": "b"}\n')
    assert load_records(tmp_path / "s.jsonl").records[1]["group"] is None  # fine on its own
    with pytest.raises(DataError, match="no FDC group") as info:
        load_records(DataSource(str(tmp_path / "s.jsonl")), require_group=True)
    assert (info.value.file, info.value.row, info.value.field) == ("s.jsonl", 2, "group")


# ---------------------------------------------------------------- through SafetyDataModule


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pairs(n: int, group: str | None = None, same: bool = False) -> list[dict]:
    rows = [{"prompt": f"How do I do thing {i}?", "chosen": f"Like this, step {i}.", "rejected": f"Like this, step {i}." if same else "No.",
             **({"group": group} if group else {})} for i in range(n)]
    return rows


def _module(general: Path, safety: Path, **kw: object):
    from equilibrate_pl.data import SafetyDataModule

    return SafetyDataModule(stage="preference", general=[DataSource(str(general))], safety=[DataSource(str(safety))],
                            builtin_world=False, mix="all", val_size=0, **kw)


def test_safety_rows_without_a_group_name_file_row_and_field(tmp_path: Path, equilibrate_cache: Path) -> None:
    general = _write(tmp_path / "general.jsonl", _pairs(8))
    safety = _write(tmp_path / "safety.jsonl", _pairs(2, "EHD") + _pairs(1))
    with pytest.raises(DataError) as info:
        _module(general, safety).setup()
    assert (info.value.file, info.value.row, info.value.field) == ("safety.jsonl", 3, "group")


def test_token_signal_field_flows_from_a_file_to_the_loss(tmp_path: Path, equilibrate_cache: Path) -> None:
    """`ama.token_signal: field` with the documented columns in data files: the values the loss masks
    with are the file's, at the positions of the response tokens they belong to."""
    from equilibrate_pl.data.tokenizer import load_tokenizer
    from equilibrate_pl.modules.preference import PreferenceModule

    tok = load_tokenizer("builtin:tiny")

    def with_signal(rows: list[dict], offset: float) -> list[dict]:
        for i, r in enumerate(rows):
            for side, sign in (("chosen", 1.0), ("rejected", -1.0)):
                n = len(tok(r[side], add_special_tokens=False)["input_ids"]) + 1  # response tokens + eos
                r[f"{side}_token_signal"] = [sign * (offset + i + t / 100) for t in range(n)]
        return rows

    general = _write(tmp_path / "general.jsonl", with_signal(_pairs(6), 0))
    safety = _write(tmp_path / "safety.jsonl", with_signal(_pairs(2, "EHD"), 100))
    data = _module(general, safety, batch_size=4)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    module = PreferenceModule(ama={"enabled": True, "token_signal": "field"})
    pairs = module.stack(batch)
    signal = module.compute_token_signal(batch, pairs, None, None, {})
    labelled = (pairs["labels"] != -100)[:, 1:]
    b = batch["index"].shape[0]
    for row, index in enumerate(batch["index"].tolist()):
        record = data.train_records[index]
        assert signal[row][labelled[row]].tolist() == pytest.approx(record["chosen_token_signal"])
        assert signal[b + row][labelled[b + row]].tolist() == pytest.approx(record["rejected_token_signal"])
    loss, _ = module.compute_loss(batch)
    assert torch.isfinite(loss)


def test_token_signal_on_some_rows_only_is_an_error_at_setup(tmp_path: Path, equilibrate_cache: Path) -> None:
    rows = _pairs(6)
    rows[0]["chosen_token_signal"] = [1.0] * 7
    general = _write(tmp_path / "general.jsonl", rows)
    safety = _write(tmp_path / "safety.jsonl", _pairs(2, "EHD"))
    with pytest.raises(DataError, match="1 of 8 rows have it and 7 do not") as info:
        _module(general, safety).setup()
    assert info.value.field == "chosen_token_signal"


def test_identical_pairs_and_truncation_are_counted(tmp_path: Path, equilibrate_cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    general = _write(tmp_path / "general.jsonl", _pairs(6) + _pairs(2, same=True))
    safety = _write(tmp_path / "safety.jsonl", _pairs(2, "EHD"))
    with caplog.at_level(logging.WARNING):
        data = _module(general, safety)
        data.setup()
    assert "train data: 2 of 10 pairs have identical chosen and rejected tokens (2 identical in the data" in caplog.text
    assert "identical chosen and rejected" in data.describe()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _module(general, safety, max_length=12, max_prompt_length=6).setup()
    assert "10 of 10 prompts were cut to their last max_prompt_length=6 tokens" in caplog.text
    assert "of 10 rows lost the end of a response to max_length=12" in caplog.text


def test_a_run_where_every_pair_is_identical_is_refused(tmp_path: Path, equilibrate_cache: Path) -> None:
    general = _write(tmp_path / "general.jsonl", _pairs(6, same=True))
    safety = _write(tmp_path / "safety.jsonl", _pairs(2, "EHD", same=True))
    with pytest.raises(DataError, match="8 of 8 pairs have identical chosen and rejected tokens.*nothing to learn"):
        _module(general, safety).setup()

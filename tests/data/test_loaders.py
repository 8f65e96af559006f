"""Loaders on the three real files and on broken files: errors name file, row and field."""

from __future__ import annotations

import csv
import gzip
import json
import logging
from pathlib import Path

import pytest

from equilibrate_pl.data.loaders import DataError, DataSource, load_records, parse_transcript, write_jsonl


def _assert_names(err: DataError, file: str, row: int | None, field: str | None) -> None:
    assert (err.file, err.row, err.field) == (file, row, field)
    text = str(err)
    assert text.startswith(file)
    if row is not None:
        assert f"row {row}" in text
    if field is not None:
        assert f"field '{field}'" in text


# ---------------------------------------------------------------- real files


def test_xstest_prompts(shared_data: Path) -> None:
    path = shared_data / "xstest" / "xstest_prompts.csv"
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    result = load_records(DataSource(str(path), preset="xstest"))
    assert len(result.records) == len(rows) == 450 and not result.skipped
    for rec, row in zip(result.records, rows):
        assert rec["prompt"] == row["prompt"]
        assert rec["id"] == f"xstest-{row['id']}"
        assert rec["meta"]["label"] == row["label"] and rec["meta"]["type"] == row["type"]
        # safe prompts only look risky -> general; unsafe contrasts carry no FDC label
        assert rec["group"] == ("general" if row["label"] == "safe" else None)
    assert result.group_counts() == {"general": 250, "None": 200}


def test_xstest_completions(shared_data: Path) -> None:
    prompts = {r["prompt"]: r["label"] for r in csv.DictReader(open(shared_data / "xstest" / "xstest_prompts.csv", encoding="utf-8"))}
    result = load_records(shared_data / "xstest" / "xstest_v2_completions_gpt4.csv", preset="xstest-completions")
    assert len(result.records) == 450
    for rec in result.records:
        assert set(rec) >= {"prompt", "response", "group", "id", "source"}
        assert rec["response"].strip() and rec["meta"]["final_label"] in {"1_full_compliance", "2_full_refusal", "3_partial_refusal"}
        if rec["prompt"] in prompts:  # the derived safe/unsafe label agrees with the prompts file
            assert rec["meta"]["label"] == prompts[rec["prompt"]]
    as_prompts = load_records(shared_data / "xstest" / "xstest_v2_completions_gpt4.csv", "prompt", preset="xstest-completions")
    assert "response" not in as_prompts.records[0] and as_prompts.records[0]["meta"]["response"]


def test_beavertails_fdc(shared_data: Path) -> None:
    path = shared_data / "beavertails-fdc" / "beavertails_selected_relabelled.json"
    raw = json.loads(path.read_text())
    result = load_records(path, preset="beavertails-fdc")
    assert len(result.records) == len(raw) == 3024
    assert result.group_counts() == {"IHD": 1550, "MHD": 482, "EHD": 433, "general": 427 + 132}
    for rec, row in zip(result.records, raw):
        assert rec["prompt"] == row["question_y"] and rec["id"] == row["id"] and rec["meta"]["label"] == row["category"]


def _final_split(transcript: str) -> tuple[str, str]:
    head, _, answer = transcript.rpartition("\n\nAssistant: ")
    return head, answer


def test_hh_rlhf(shared_data: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = shared_data / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    with pytest.raises(DataError) as info:
        load_records(path, preset="hh-rlhf")
    _assert_names(info.value, "harmless-base-test.jsonl.gz", 87, "chosen")

    with caplog.at_level(logging.WARNING):
        result = load_records(path, preset="hh-rlhf", on_bad_row="skip")
    raw = [json.loads(line) for line in gzip.open(path, "rt", encoding="utf-8")]
    assert len(result.records) + len(result.skipped) == len(raw) == 2312
    assert [s.row for s in result.skipped if s.field == "chosen"] == [87, 517, 926, 1104]
    assert [s.row for s in result.skipped if s.field == "rejected"] == [1255, 1689, 1951, 1953, 2037]
    assert "9 rows skipped" in caplog.text
    skipped = {s.row for s in result.skipped}
    good = [r for i, r in enumerate(raw, 1) if i not in skipped]
    for rec, row in zip(result.records, good):
        head, answer = _final_split(row["chosen"])
        assert rec["chosen"] == answer.strip() and rec["rejected"] == _final_split(row["rejected"])[1].strip()
        assert rec["prompt"][-1]["role"] == "user"
        assert rec["prompt"][0]["content"] == head.split("\n\nHuman: ")[1].split("\n\nAssistant: ")[0].strip()
        assert len(rec["prompt"]) == head.count("\n\nHuman: ") + head.count("\n\nAssistant: ")


def test_parse_transcript() -> None:
    msgs = parse_transcript("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye")
    assert msgs == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]
    with pytest.raises(ValueError):
        parse_transcript("preamble\n\nHuman: hi")


# ---------------------------------------------------------------- formats


def test_other_formats_agree(tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": f"question {i}?", "label": g} for i, g in enumerate(["EHD", "ihd", "No risk"])]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as fh:
        fh.write("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "disk"))
    with open(tmp_path / "a.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ["text", "label"])
        w.writeheader()
        w.writerows(rows)
    outs = []
    for name in ["a.jsonl", "a.jsonl.gz", "a.json", "a.parquet", "disk", "a.csv"]:
        res = load_records(DataSource(str(tmp_path / name), columns={"text": "prompt", "label": "group"}), group_map={"no risk": "general"})
        outs.append([(r["prompt"], r["group"]) for r in res.records])
    assert all(o == [("question 0?", "EHD"), ("question 1?", "IHD"), ("question 2?", "general")] for o in outs)


def test_forced_group_and_ids(tmp_path: Path) -> None:
    (tmp_path / "g.jsonl").write_text('{"prompt": "hello"}\n{"prompt": "bye", "id": 7}\n')
    res = load_records(DataSource(str(tmp_path / "g.jsonl"), group="general", name="helpful"))
    assert [(r["id"], r["group"], r["source"]) for r in res.records] == [("helpful-1", "general", "helpful"), ("7", "general", "helpful")]
    assert load_records(tmp_path / "g.jsonl").records[0]["group"] is None


def test_preference_and_sft_kinds(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}],
                                                  "chosen": "hello", "rejected": "go away", "extra": 1}) + "\n")
    rec = load_records(tmp_path / "p.jsonl", "preference").records[0]
    assert rec["chosen"] == "hello" and rec["meta"] == {"extra": 1} and rec["prompt"][0]["role"] == "system"
    with pytest.raises(DataError) as info:
        load_records(tmp_path / "p.jsonl", "sft")
    _assert_names(info.value, "p.jsonl", 1, "response")


# ---------------------------------------------------------------- broken files


@pytest.mark.parametrize("name, content", [("e.csv", b""), ("e.jsonl", b"\n\n"), ("e.json", b"[]"), ("h.csv", b"prompt,group\n")])
def test_empty_file(tmp_path: Path, name: str, content: bytes) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match="empty") as info:
        load_records(tmp_path / name)
    assert info.value.file == name


def test_missing_column(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("question,group\nhow are you?,general\n")
    with pytest.raises(DataError, match="missing") as info:
        load_records(tmp_path / "m.csv")
    _assert_names(info.value, "m.csv", 1, "prompt")
    assert "question" in str(info.value)  # tells the user which columns exist
    # the preset's source column is named, not the schema field
    (tmp_path / "b.json").write_text(json.dumps([{"question": "x", "category": "IHD"}]))
    with pytest.raises(DataError) as info:
        load_records(tmp_path / "b.json", preset="beavertails-fdc")
    _assert_names(info.value, "b.json", 1, "question_y")


def test_wrong_type(tmp_path: Path) -> None:
    (tmp_path / "t.json").write_text(json.dumps([{"prompt": "fine"}, {"prompt": 3.5}]))
    with pytest.raises(DataError, match="expected a non-empty string or a non-empty message list, got float") as info:
        load_records(tmp_path / "t.json")
    _assert_names(info.value, "t.json", 2, "prompt")


def test_unknown_group(tmp_path: Path) -> None:
    (tmp_path / "u.jsonl").write_text('{"prompt": "a", "group": "EHD"}\n{"prompt": "b", "group": "medium"}\n')
    with pytest.raises(DataError, match="unknown group label 'medium'") as info:
        load_records(tmp_path / "u.jsonl")
    _assert_names(info.value, "u.jsonl", 2, "group")
    assert load_records(tmp_path / "u.jsonl", group_map={"Medium": "IHD"}).records[1]["group"] == "IHD"


def test_invalid_utf8(tmp_path: Path) -> None:
    (tmp_path / "b.csv").write_bytes(b"prompt,group\nfine,EHD\n\"multi\nline\",IHD\nbad \xff\xfe bytes,EHD\n")
    with pytest.raises(DataError, match="invalid UTF-8") as info:
        load_records(tmp_path / "b.csv")
    _assert_names(info.value, "b.csv", 3, "prompt")  # row 3 although it is line 5: quoted newlines counted right
    (tmp_path / "b.jsonl").write_bytes(b'{"prompt": "ok"}\n{"prompt": "ok"}\n{"prompt": "x\xc3"}\n')
    with pytest.raises(DataError, match="invalid UTF-8") as info:
        load_records(tmp_path / "b.jsonl")
    _assert_names(info.value, "b.jsonl", 3, "prompt")


def test_csv_row_numbers_and_column_count(tmp_path: Path) -> None:
    (tmp_path / "r.csv").write_text('prompt,group\n\n"a, quoted",EHD\n\nb,IHD,extra\n')
    with pytest.raises(DataError, match="expected 2 columns, got 3") as info:
        load_records(tmp_path / "r.csv")
    _assert_names(info.value, "r.csv", 2, None)  # blank lines are not counted as rows


def test_overlong_row(tmp_path: Path) -> None:
    (tmp_path / "l.jsonl").write_text(json.dumps({"prompt": "short"}) + "\n" + json.dumps({"prompt": "x" * 51}) + "\n")
    with pytest.raises(DataError, match="51 characters, over the limit max_chars=50") as info:
        load_records(tmp_path / "l.jsonl", max_chars=50)
    _assert_names(info.value, "l.jsonl", 2, "prompt")


def test_malformed_json_line(tmp_path: Path) -> None:
    (tmp_path / "j.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b",\n{"prompt": "c"}\n')
    with pytest.raises(DataError, match="malformed JSON") as info:
        load_records(tmp_path / "j.jsonl")
    _assert_names(info.value, "j.jsonl", 2, None)


@pytest.mark.parametrize("prompt, match", [
    ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}, {"role": "user", "content": "c"}], "unknown role 'robot'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message must be from 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}], "'system' message may only come first"),
    ([{"role": "user"}], "expected an object with 'role' and 'content'"),
    ([], "non-empty message list"),
])
def test_bad_message_lists(tmp_path: Path, prompt: list, match: str) -> None:
    (tmp_path / "c.jsonl").write_text(json.dumps({"prompt": prompt}) + "\n")
    with pytest.raises(DataError, match=match) as info:
        load_records(tmp_path / "c.jsonl")
    _assert_names(info.value, "c.jsonl", 1, "prompt")


def test_skip_mode_counts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lines = ['{"prompt": "a"}', '{"prompt": ', '{"prompt": "c"}', '{"prompt": ""}', '{"prompt": "e", "group": "x"}', '{"prompt": "f"}']
    (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        res = load_records(tmp_path / "s.jsonl", on_bad_row="skip")
    assert [r["prompt"] for r in res.records] == ["a", "c", "f"]
    assert [(s.row, s.field) for s in res.skipped] == [(2, None), (4, "prompt"), (5, "group")]
    assert "3 records loaded, 3 rows skipped" in res.summary() and "3 rows skipped" in caplog.text
    (tmp_path / "all.jsonl").write_text('{"q": 1}\n{"q": 2}\n')
    with pytest.raises(DataError, match="every row is bad"):
        load_records(tmp_path / "all.jsonl", on_bad_row="skip")


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "x.jsonl").write_text('{"prompt": "a"}\n')
    with pytest.raises(ValueError, match="unknown preset"):
        load_records(tmp_path / "x.jsonl", preset="nope")
    with pytest.raises(ValueError, match="not 'sft'"):
        load_records(tmp_path / "x.jsonl", "sft", preset="hh-rlhf")


def test_write_jsonl_atomic_roundtrip(tmp_path: Path) -> None:
    recs = [{"prompt": "é ✓", "group": "EHD", "meta": {"n": 1}}, {"prompt": [{"role": "user", "content": "x"}], "group": None}]
    out = tmp_path / "sub" / "o.jsonl"
    assert write_jsonl(recs, out) == 2
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == recs
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.jsonl"]


# ---------------------------------------------------------------- safety labels (the cost model's columns)


def test_safety_labels_load_from_json_and_csv(tmp_path: Path) -> None:
    rows = [
        {"prompt": "p1", "chosen": "a", "rejected": "b", "chosen_unsafe": False, "rejected_unsafe": True},
        {"prompt": "p2", "chosen": "a", "rejected": "b", "chosen_unsafe": True, "rejected_unsafe": True,
         "safer_response": "rejected"},
        {"prompt": "p3", "chosen": "a", "rejected": "b"},  # no labels: a plain pair
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = load_records(path, "preference").records
    assert [(r.get("chosen_unsafe"), r.get("rejected_unsafe"), r.get("safer_response")) for r in records] == [
        (False, True, None), (True, True, "rejected"), (None, None, None)]
    assert "chosen_unsafe" not in records[0]["meta"]  # top-level fields, not meta
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("prompt,chosen,rejected,chosen_unsafe,rejected_unsafe\np,a,b,false,TRUE\nq,a,b,0,1\nr,a,b,no,yes\n")
    assert [(r["chosen_unsafe"], r["rejected_unsafe"]) for r in load_records(csv_path, "preference").records] == [(False, True)] * 3


@pytest.mark.parametrize(("row", "field", "match"), [
    ({"chosen_unsafe": True}, "rejected_unsafe", "come together"),
    ({"chosen_unsafe": "maybe", "rejected_unsafe": False}, "chosen_unsafe", "expected true or false"),
    ({"chosen_unsafe": 2, "rejected_unsafe": False}, "chosen_unsafe", "expected true or false"),
    ({"chosen_unsafe": True, "rejected_unsafe": False, "safer_response": "first"}, "safer_response", "'chosen' or 'rejected'"),
    ({"safer_response": "chosen"}, "safer_response", "without"),
])
def test_bad_safety_labels_name_row_and_field(tmp_path: Path, row: dict, field: str, match: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                    + json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", **row}) + "\n")
    with pytest.raises(DataError, match=match) as info:
        load_records(path, "preference")
    _assert_names(info.value, "bad.jsonl", 2, field)


def test_pku_saferlhf_preset_gives_the_safety_labels(tmp_path: Path) -> None:
    rows = [
        {"prompt": "p", "response_0": "harmful", "response_1": "refusal", "is_response_0_safe": False,
         "is_response_1_safe": True, "safer_response_id": 1, "better_response_id": 0},
        {"prompt": "q", "response_0": "a", "response_1": "b", "is_response_0_safe": False, "is_response_1_safe": False,
         "safer_response_id": 0, "better_response_id": 1},
    ]
    path = tmp_path / "pku.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first, second = load_records(path, preset="pku-saferlhf").records
    assert (first["chosen"], first["chosen_unsafe"], first["rejected"], first["rejected_unsafe"]) == ("refusal", False, "harmful", True)
    # both unsafe: the dataset's safer_response_id still orders the pair (chosen is the safer one)
    assert (second["chosen"], second["chosen_unsafe"], second["rejected_unsafe"], second["safer_response"]) == ("a", True, True, "chosen")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**rows[0], "is_response_1_safe": "yes"}) + "\n")
    with pytest.raises(DataError, match="expected true or false") as info:
        load_records(bad, preset="pku-saferlhf")
    _assert_names(info.value, "bad.jsonl", 1, "is_response_1_safe")

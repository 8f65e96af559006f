"""equilibrate_pl.files: every format is written whole or not at all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from equilibrate_pl.files import atomic_path, atomic_torch_save, atomic_write_json, atomic_write_jsonl, atomic_write_text


def test_each_writer_round_trips_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    out = tmp_path / "new" / "dir"
    atomic_write_text(out / "a.md", "héllo\n")
    atomic_write_json(out / "b.json", {"t": torch.tensor([1.5, 2.0]), "p": Path("x/y"), "n": 3})
    assert atomic_write_jsonl(out / "c.jsonl", ({"i": i} for i in range(3))) == 3
    atomic_torch_save({"w": torch.arange(4)}, out / "d.pt")
    assert (out / "a.md").read_text(encoding="utf-8") == "héllo\n"
    assert json.loads((out / "b.json").read_text()) == {"t": [1.5, 2.0], "p": "x/y", "n": 3}
    assert [json.loads(line) for line in (out / "c.jsonl").read_text().splitlines()] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert torch.equal(torch.load(out / "d.pt", weights_only=True)["w"], torch.arange(4))
    assert sorted(p.name for p in out.iterdir()) == ["a.md", "b.json", "c.jsonl", "d.pt"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "rows.jsonl"
    atomic_write_jsonl(target, [{"old": True}])

    def rows():
        yield {"new": 1}
        raise RuntimeError("source broke half way")

    with pytest.raises(RuntimeError, match="half way"):
        atomic_write_jsonl(target, rows())
    assert target.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def test_the_temporary_name_keeps_the_suffix_for_format_sniffing_writers(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "plot.png") as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp.name.startswith(".plot.png.")
        tmp.write_bytes(b"png")
    assert (tmp_path / "plot.png").read_bytes() == b"png"

from __future__ import annotations

import json

import pytest
import torch

from davsp_lib.runtime.errors import DataError
from davsp_lib.runtime.io import (
    atomic_open,
    atomic_write_json,
    atomic_write_text,
    read_artifact,
    read_csv_rows,
    read_json,
    read_text,
    write_artifact,
)


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "sub" / "a.json"
    atomic_write_json(target, {"x": 1})
    assert json.loads(target.read_text()) == {"x": 1}
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["a.json"]  # no temp files left


def test_failed_write_keeps_the_finished_file(tmp_path):
    target = tmp_path / "result.txt"
    atomic_write_text(target, "finished work")
    with pytest.raises(RuntimeError), atomic_open(target, "w", encoding="utf-8") as handle:
        handle.write("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "finished work"
    assert [p.name for p in tmp_path.iterdir()] == ["result.txt"]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "file is empty"),
        (b"   \n", "file is empty"),
        (b"caf\xe9", "not valid UTF-8 (byte 0xe9 at offset 3)"),
    ],
)
def test_read_text_problems_name_the_file(tmp_path, content, problem):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        read_text(path)
    assert str(path) in str(info.value) and problem in str(info.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match=r"nope\.json: file not found"):
        read_json(tmp_path / "nope.json")
    with pytest.raises(DataError, match="is a directory"):
        read_text(tmp_path)


def test_malformed_json_names_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"a": 1,\n "b": }')
    with pytest.raises(DataError, match=r"broken.json: malformed JSON at line 2, column 7"):
        read_json(path)


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"ok": true}')
    assert read_json(path) == {"ok": True}


def test_csv_missing_column_and_ragged_rows(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("id,question\n1,hello\n2\n3,a,extra\n")
    rows = read_csv_rows(path, ["id", "question"])
    assert [r["__line__"] for r in rows] == ["2", "3", "4"]
    assert rows[1]["question"] is None  # short row: caller decides (skip or raise)
    assert rows[2]["__extra__"] == ["extra"]
    with pytest.raises(DataError, match=r"missing CSV column\(s\) \['answer'\]"):
        read_csv_rows(path, ["id", "answer"])


def test_atomic_files_get_normal_permissions(tmp_path):
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    path = atomic_write_text(tmp_path / "shared.txt", "x")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_artifact_pair_round_trip_and_checks(tmp_path):
    tensor_path, json_path = write_artifact(
        tmp_path / "art.x", {"t": torch.arange(3.0)}, format="f/1", fields={"k": 2},
        metadata={"m": [1]},
    )  # fmt: skip
    assert (tensor_path.name, json_path.name) == ("art.safetensors", "art.json")
    header = json.loads(json_path.read_text())
    assert list(header) == ["format", "k", "tensors", "metadata"]
    assert header["tensors"]["file"] == "art.safetensors"
    header, tensors = read_artifact(tmp_path / "art", format="f/1", what="thing")
    assert header["k"] == 2 and tensors["t"].tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(DataError, match=r"art\.json: not a thing \(format 'f/1'"):
        read_artifact(tmp_path / "art", format="g/1", what="thing")
    write_artifact(tmp_path / "other", {"t": torch.ones(3)}, format="f/1", fields={}, metadata={})
    tensor_path.write_bytes((tmp_path / "other.safetensors").read_bytes())
    with pytest.raises(DataError, match=r"art\.safetensors: sha256 differs"):
        read_artifact(tmp_path / "art", format="f/1", what="thing")
    tensor_path.write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"not a readable safetensors file .*also differs"):
        read_artifact(tmp_path / "art", format="f/1", what="thing")
    with pytest.raises(DataError, match=r"nope\.json: thing metadata file not found"):
        read_artifact(tmp_path / "nope", format="f/1", what="thing")
    with pytest.raises(TypeError):
        write_artifact(tmp_path / "bad", {}, format="f/1", fields={}, metadata={"x": object()})
    assert not (tmp_path / "bad.safetensors").exists()

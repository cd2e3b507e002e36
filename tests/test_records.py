from __future__ import annotations

from pathlib import Path

import pytest

from davsp_lib.data.records import Dataset, Label, Record, RenderSpec, Skipped, concat


def make(id_: str, label: Label = Label.BENIGN, **kw) -> Record:
    return Record(id=id_, query="q", label=label, source="unit", **kw)


def test_record_image_kinds_and_json():
    file_record = make("a", image_path=Path("x.png"))
    rendered = make("b", Label.MALICIOUS, render=RenderSpec("figstep", "Steps to x."), group="g")
    text_only = make("c")
    assert file_record.has_image and rendered.has_image and not text_only.has_image
    assert rendered.is_malicious and rendered.group_key == "g" and text_only.group_key == "c"
    assert rendered.to_json()["render"] == {"style": "figstep", "text": "Steps to x."}
    assert file_record.to_json()["image_path"] == "x.png"
    with pytest.raises(ValueError, match="not both"):
        make("d", image_path=Path("x.png"), render=RenderSpec("typo", "x"))


def test_records_hash_despite_meta():
    assert len({make("a", meta={"k": [1]}), make("a", meta={"k": [2]})}) == 1


def test_dataset_report_names_every_skip():
    data = Dataset(
        "unit",
        [make("a"), make("b", Label.MALICIOUS)],
        [Skipped("row7", Path("f.csv"), "empty query")],
    )
    assert data.counts() == {"benign": 1, "malicious": 1}
    report = data.report()
    assert "2 records" in report and "1 skipped" in report and "row7 (f.csv): empty query" in report


def test_concat_refuses_duplicate_ids():
    first, second = Dataset("x", [make("a")]), Dataset("y", [make("b")])
    assert [r.id for r in (first + second)] == ["a", "b"]
    with pytest.raises(ValueError, match="duplicate record ids"):
        concat([first, Dataset("z", [make("a")])])

"""Splits: deterministic, stratified, group-aware, disjoint, and saved exactly."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from davsp_lib.data.records import Dataset, Label, Record
from davsp_lib.data.splits import Splits, make_splits
from davsp_lib.runtime.errors import DataError


def make_records(n_malicious: int, n_benign: int, group_size: int = 1) -> list[Record]:
    """Records whose groups hold ``group_size`` consecutive records of one label."""
    records = []
    for label, count in ((Label.MALICIOUS, n_malicious), (Label.BENIGN, n_benign)):
        for index in range(count):
            records.append(
                Record(
                    id=f"{label.value}/{index:04d}",
                    query=f"q{index}",
                    label=label,
                    source="test",
                    group=f"{label.value}/g{index // group_size}",
                )
            )
    return records


def labels_of(records: list[Record]) -> Counter:
    return Counter(record.label.value for record in records)


def test_counts_are_exact_and_disjoint() -> None:
    records = make_records(60, 40)
    splits = make_splits(records, {"train": 50, "val": 20, "test": 30}, seed=0)
    assert splits.counts() == {"train": 50, "val": 20, "test": 30}
    everything = [i for ids in splits.ids.values() for i in ids]
    assert len(everything) == len(set(everything)) == 100
    assert all(ids == sorted(ids) for ids in splits.ids.values())


def test_fractions() -> None:
    records = make_records(61, 42)
    splits = make_splits(records, {"train": 0.7, "test": 0.3}, seed=3)
    assert splits.counts() == {"train": 72, "test": 31}  # 72.1 + 30.9: remainders go to test
    part = make_splits(records, {"small": 0.1}, seed=3)
    assert part.counts() == {"small": 10}


def test_deterministic_and_order_independent() -> None:
    records = make_records(30, 30, group_size=2)
    sizes = {"a": 20, "b": 20}
    first = make_splits(records, sizes, seed=11)
    shuffled = list(records)
    random.Random(5).shuffle(shuffled)
    assert make_splits(shuffled, sizes, seed=11) == first
    assert make_splits(Dataset("d", shuffled), sizes, seed=11) == first
    assert make_splits(records, sizes, seed=12).ids != first.ids


def test_stratified_by_label() -> None:
    records = make_records(300, 100)
    splits = make_splits(records, {"train": 200, "val": 100, "test": 100}, seed=1)
    for name, size in splits.counts().items():
        malicious = labels_of(splits.select(records, name))["malicious"]
        assert abs(malicious - size * 0.75) <= 1, (name, malicious)


def test_unstratified_still_complete() -> None:
    records = make_records(300, 100)
    splits = make_splits(records, {"a": 0.5, "b": 0.5}, seed=1, stratify=False)
    assert splits.counts() == {"a": 200, "b": 200} and not splits.stratify


def test_groups_never_straddle_splits() -> None:
    records = make_records(90, 60, group_size=3)
    splits = make_splits(records, {"train": 90, "test": 60}, seed=4)
    where = {}
    for name in splits.names:
        for record in splits.select(records, name):
            assert where.setdefault(record.group_key, name) == name


def test_mixed_label_groups_are_kept_together() -> None:
    """VLGuard-style: a safe image's benign and malicious instructions share a group."""
    records = []
    for index in range(40):
        for label in (Label.BENIGN, Label.MALICIOUS):
            records.append(
                Record(
                    id=f"v/{index}/{label.value}",
                    query="q",
                    label=label,
                    source="t",
                    group=f"img{index}",
                )
            )
    records += make_records(20, 0)
    splits = make_splits(records, {"train": 0.5, "test": 0.5}, seed=0)
    for name in splits.names:
        chosen = splits.select(records, name)
        groups = Counter(r.group_key for r in chosen if r.group_key.startswith("img"))
        assert set(groups.values()) == {2}


def test_unreachable_exact_count_with_groups() -> None:
    records = make_records(20, 0, group_size=2)  # every group holds 2 records
    with pytest.raises(ValueError, match="cannot take exactly 5 records"):
        make_splits(records, {"a": 5}, seed=0)
    assert make_splits(records, {"a": 0.25}, seed=0).counts() == {"a": 4}  # fraction: best fit


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ({"a": 80, "b": 30}, "not enough records"),
        ({"a": 0.7, "b": 0.4}, "fractions sum"),
        ({"a": 1.5}, "fraction must be in"),
        ({"a": -1}, "count must be >= 0"),
        ({"a": True}, "size must be an int count or a float fraction"),
        ({}, "sizes is empty"),
    ],
)
def test_bad_sizes(sizes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_splits(make_records(60, 40), sizes, seed=0)


def test_duplicate_ids_rejected() -> None:
    records = make_records(5, 5)
    with pytest.raises(ValueError, match="duplicate record ids"):
        make_splits([*records, records[0]], {"a": 2}, seed=0)


def test_select() -> None:
    records = make_records(10, 10)
    splits = make_splits(records, {"a": 5, "b": 5}, seed=0)
    chosen = splits.select(Dataset("d", records), "a")
    assert [r.id for r in chosen] == splits.ids["a"]
    with pytest.raises(KeyError, match="no split named 'c'"):
        splits.select(records, "c")
    with pytest.raises(ValueError, match="not in the given records"):
        splits.select(records[:3], "a")


def test_json_and_file_round_trip(tmp_path: Path) -> None:
    splits = make_splits(make_records(30, 20), {"train": 0.6, "val": 7, "test": 0.1}, seed=9)
    assert Splits.from_json(json.loads(json.dumps(splits.to_json()))) == splits
    path = splits.save(tmp_path / "splits" / "main.json")
    loaded = Splits.load(path)
    assert loaded == splits
    assert loaded.sizes == {"train": 0.6, "val": 7, "test": 0.1}
    assert isinstance(loaded.sizes["val"], int) and isinstance(loaded.sizes["test"], float)
    assert list(tmp_path.joinpath("splits").iterdir()) == [path]  # atomic: no temp file left


def test_load_rejects_bad_files(tmp_path: Path) -> None:
    splits = make_splits(make_records(10, 10), {"a": 5, "b": 5}, seed=0)
    data = splits.to_json()
    data["ids"]["b"].append(data["ids"]["a"][0])
    path = tmp_path / "overlap.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(DataError, match=r"overlap\.json.*is in split 'a' and 'b'"):
        Splits.load(path)
    path.write_text(json.dumps({"format": "something else"}), encoding="utf-8")
    with pytest.raises(DataError, match="not a splits file"):
        Splits.load(path)
    path.write_text("{", encoding="utf-8")
    with pytest.raises(DataError, match="malformed JSON"):
        Splits.load(path)


def test_real_vlguard_split(shared_data: Path) -> None:
    from davsp_lib.data.datasets import load_vlguard

    train = load_vlguard(shared_data, "train")
    splits = make_splits(train, {"vector": 940, "rest": 0.5}, seed=0)
    assert splits.counts()["vector"] == 940
    chosen = splits.select(train, "vector")
    share = labels_of(chosen)["malicious"] / len(chosen)
    assert abs(share - 2000 / 2977) < 0.02
    groups = {name: {r.group_key for r in splits.select(train, name)} for name in splits.names}
    assert not groups["vector"] & groups["rest"]

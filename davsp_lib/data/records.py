"""One typed record per sample, and the collection a loader returns (records + counted skips)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, Literal

RenderStyle = Literal["figstep", "typo"]


class Label(str, Enum):
    MALICIOUS = "malicious"
    BENIGN = "benign"


@dataclass(frozen=True)
class RenderSpec:
    """An image we render ourselves from text (cached on disk by :mod:`davsp_lib.data.images`)."""

    style: RenderStyle
    text: str


@dataclass(frozen=True)
class Record:
    """One sample: an optional image, the text query given with it, and its label.

    ``id`` is unique across sources (``"<source>/<native id>"``). The image is either a file
    (``image_path``) or rendered by us (``render``); text-only samples have neither.
    ``group`` ties records that share an underlying instruction (the same question as text and
    as an image) so that splits never put them on both sides.
    """

    id: str
    query: str
    label: Label
    source: str
    category: str | None = None
    image_path: Path | None = None
    render: RenderSpec | None = None
    reference: str | None = None
    group: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        if self.image_path is not None and self.render is not None:
            raise ValueError(f"record {self.id}: give image_path or render, not both")

    @property
    def has_image(self) -> bool:
        return self.image_path is not None or self.render is not None

    @property
    def is_malicious(self) -> bool:
        return self.label is Label.MALICIOUS

    @property
    def group_key(self) -> str:
        return self.group or self.id

    def with_(self, **changes: Any) -> Record:
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe summary (for results files and manifests)."""
        return {
            "id": self.id,
            "query": self.query,
            "label": self.label.value,
            "source": self.source,
            "category": self.category,
            "image_path": None if self.image_path is None else str(self.image_path),
            "render": None
            if self.render is None
            else {"style": self.render.style, "text": self.render.text},
            "group": self.group,
        }


@dataclass(frozen=True)
class Skipped:
    """A row a loader could not use: which item, in which file, and why."""

    id: str
    path: Path
    reason: str


@dataclass
class Dataset:
    """What a loader returns: the usable records and every skipped row, counted and named."""

    name: str
    records: list[Record]
    skipped: list[Skipped] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __getitem__(self, index: int) -> Record:
        return self.records[index]

    def counts(self) -> dict[str, int]:
        return dict(Counter(record.label.value for record in self.records))

    def report(self) -> str:
        """One line per skip plus a summary; empty skips give a one-line summary."""
        lines = [
            f"{self.name}: {len(self.records)} records {self.counts()}, {len(self.skipped)} skipped"
        ]
        lines += [f"  skipped {s.id} ({s.path}): {s.reason}" for s in self.skipped]
        return "\n".join(lines)

    def __add__(self, other: Dataset) -> Dataset:
        return concat([self, other])


def concat(datasets: list[Dataset], name: str | None = None) -> Dataset:
    """Concatenate datasets; duplicate ids are an error (they would break splits and results)."""
    records = [record for dataset in datasets for record in dataset.records]
    duplicates = [key for key, count in Counter(r.id for r in records).items() if count > 1]
    if duplicates:
        raise ValueError(f"duplicate record ids across datasets: {duplicates[:5]}")
    return Dataset(
        name=name or "+".join(d.name for d in datasets),
        records=records,
        skipped=[s for d in datasets for s in d.skipped],
    )

"""Deterministic, stratified, group-aware splits that are saved next to the results.

Given the same records (in any order), sizes and seed, :func:`make_splits` returns the same
split on every machine: records are sorted by id, groups are ordered by their first id and
shuffled with ``random.Random(seed)`` (whose shuffle is stable across Python versions). All
records of one group (:attr:`Record.group_key`) land in one split, so the text and image variants
of a question never straddle train and test.

Stratification: groups are bucketed by their set of labels, each bucket is shuffled, and the
buckets are interleaved evenly into one queue; splits are then filled in order from that queue,
so every split gets each bucket's share up to one group.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from davsp_lib.data.records import Dataset, Record
from davsp_lib.runtime.errors import DataError
from davsp_lib.runtime.io import atomic_write_json, read_json

SPLITS_FORMAT = "davsp-splits/1"


@dataclass(frozen=True)
class Splits:
    """Named lists of record ids (each sorted), with the seed and sizes that made them."""

    seed: int
    sizes: dict[str, int | float]
    ids: dict[str, list[str]]
    stratify: bool = True
    n_records: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.ids)

    def counts(self) -> dict[str, int]:
        return {name: len(ids) for name, ids in self.ids.items()}

    def select(self, data: Dataset | Iterable[Record], name: str) -> list[Record]:
        """The records of split ``name``, in the split's id order; unknown ids raise."""
        if name not in self.ids:
            raise KeyError(f"no split named {name!r}; splits are {self.names}")
        by_id = {record.id: record for record in data}
        missing = [record_id for record_id in self.ids[name] if record_id not in by_id]
        if missing:
            raise ValueError(
                f"split {name!r}: {len(missing)} id(s) not in the given records, e.g. {missing[:3]}"
            )
        return [by_id[record_id] for record_id in self.ids[name]]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": SPLITS_FORMAT,
            "seed": self.seed,
            "stratify": self.stratify,
            "n_records": self.n_records,
            "sizes": dict(self.sizes),
            "counts": self.counts(),
            "meta": dict(self.meta),
            "ids": {name: list(ids) for name, ids in self.ids.items()},
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], path: str | Path | None = None) -> Splits:
        """Inverse of :meth:`to_json`; a malformed object raises :class:`DataError`."""
        if not isinstance(obj, Mapping) or obj.get("format") != SPLITS_FORMAT:
            raise DataError(path, f"not a splits file (expected format {SPLITS_FORMAT!r})")
        ids = obj.get("ids")
        if not isinstance(ids, Mapping) or not all(
            isinstance(v, list) and all(isinstance(i, str) for i in v) for v in ids.values()
        ):
            raise DataError(path, "'ids' must map split names to lists of id strings")
        sizes = obj.get("sizes")
        if not isinstance(sizes, Mapping) or set(sizes) != set(ids):
            raise DataError(path, "'sizes' must name the same splits as 'ids'")
        seed = obj.get("seed")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise DataError(path, f"'seed' must be an integer, got {seed!r}")
        splits = cls(
            seed=seed,
            sizes=dict(sizes),
            ids={name: list(values) for name, values in ids.items()},
            stratify=bool(obj.get("stratify", True)),
            n_records=obj.get("n_records"),
            meta=dict(obj.get("meta") or {}),
        )
        try:
            _check_disjoint(splits.ids)
        except AssertionError as exc:
            raise DataError(path, str(exc)) from None
        return splits

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Splits:
        return cls.from_json(read_json(path), path)


def make_splits(
    records: Dataset | Iterable[Record],
    sizes: Mapping[str, int | float],
    seed: int,
    *,
    stratify: bool = True,
) -> Splits:
    """Split records into named parts: ``int`` sizes are record counts, ``float`` fractions.

    Counts are exact (a ValueError says so when group sizes make a count unreachable);
    fractions are rounded to counts and may come out a few records short when groups do not
    fit. Records not claimed by any size are left out.
    """
    ordered = sorted(records, key=lambda record: record.id)
    _check_unique(ordered)
    targets = _targets(sizes, len(ordered))
    groups = _groups(ordered)
    queue = _interleave(_strata(groups, stratify), random.Random(seed))
    assigned = _fill(queue, {key: len(members) for key, members in groups.items()}, targets)
    for name, target in targets.items():
        got = sum(len(groups[key]) for key in assigned[name])
        if isinstance(sizes[name], int) and got != target:
            raise ValueError(
                f"split {name!r}: cannot take exactly {target} records with whole groups "
                f"(got {got}); adjust the size or the grouping"
            )
    ids = {name: sorted(r.id for key in assigned[name] for r in groups[key]) for name in targets}
    _check_disjoint(ids)
    return Splits(seed=seed, sizes=dict(sizes), ids=ids, stratify=stratify, n_records=len(ordered))


def _check_unique(records: list[Record]) -> None:
    duplicates = sorted(key for key, n in Counter(r.id for r in records).items() if n > 1)
    if duplicates:
        raise ValueError(f"duplicate record ids: {duplicates[:5]}")


def _targets(sizes: Mapping[str, int | float], total: int) -> dict[str, int]:
    """Record counts per split; fractions use largest remainders so that they sum exactly."""
    if not sizes:
        raise ValueError("sizes is empty: name at least one split")
    counts: dict[str, int] = {}
    remainders: dict[str, float] = {}
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, (int, float)):
            raise ValueError(f"split {name!r}: size must be an int count or a float fraction")
        if isinstance(size, float):
            if not 0.0 <= size <= 1.0 or math.isnan(size):
                raise ValueError(f"split {name!r}: fraction must be in [0, 1], got {size}")
            exact = size * total
            counts[name], remainders[name] = math.floor(exact), exact - math.floor(exact)
        else:
            if size < 0:
                raise ValueError(f"split {name!r}: count must be >= 0, got {size}")
            counts[name] = size
    fractions = sum(size for size in sizes.values() if isinstance(size, float))
    if fractions > 1.0 + 1e-9:
        raise ValueError(f"fractions sum to {fractions:.4f} > 1")
    spare = total - sum(counts.values())
    wanted = round(sum(remainders.values()))
    for name in sorted(remainders, key=lambda n: (-remainders[n], n))[: max(0, min(wanted, spare))]:
        counts[name] += 1
    if sum(counts.values()) > total:
        raise ValueError(
            f"not enough records: the splits ask for {sum(counts.values())} "
            f"({dict(counts)}) but only {total} were given"
        )
    return counts


def _groups(records: list[Record]) -> dict[str, list[Record]]:
    """group key -> records, in order of each group's first (smallest) id."""
    groups: dict[str, list[Record]] = {}
    for record in records:
        groups.setdefault(record.group_key, []).append(record)
    return groups


def _strata(groups: dict[str, list[Record]], stratify: bool) -> list[list[str]]:
    """Group keys bucketed by the set of labels in the group (mixed groups get their own)."""
    buckets: dict[tuple[str, ...], list[str]] = {}
    for key, members in groups.items():
        stratum = tuple(sorted({r.label.value for r in members})) if stratify else ()
        buckets.setdefault(stratum, []).append(key)
    return [buckets[stratum] for stratum in sorted(buckets)]


def _interleave(strata: list[list[str]], rng: random.Random) -> list[str]:
    """Shuffle each stratum, then merge them so that any prefix holds each one's share."""
    keyed: list[tuple[float, int, str]] = []
    for index, keys in enumerate(strata):
        shuffled = list(keys)
        rng.shuffle(shuffled)
        keyed += [((j + 0.5) / len(shuffled), index, key) for j, key in enumerate(shuffled)]
    return [key for _, _, key in sorted(keyed)]


def _fill(
    queue: list[str], group_sizes: Mapping[str, int], targets: dict[str, int]
) -> dict[str, list[str]]:
    """Fill splits in order from the queue, first fit: a group too big for what a split still
    needs waits for the next split."""
    assigned: dict[str, list[str]] = {}
    waiting = queue
    for name, target in targets.items():
        taken: list[str] = []
        left_over: list[str] = []
        need = target
        for key in waiting:
            if 0 < group_sizes[key] <= need:
                taken.append(key)
                need -= group_sizes[key]
            else:
                left_over.append(key)
        assigned[name], waiting = taken, left_over
    return assigned


def _check_disjoint(ids: Mapping[str, list[str]]) -> None:
    """No id twice anywhere (an explicit check: ``assert`` vanishes under ``python -O``)."""
    seen: dict[str, str] = {}
    for name, values in ids.items():
        for record_id in values:
            if record_id in seen:
                raise AssertionError(f"id {record_id} is in split {seen[record_id]!r} and {name!r}")
            seen[record_id] = name

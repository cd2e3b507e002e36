"""The data pools of a preset: vector, training, selection and evaluation, disjoint by group.

One place for the recipe of every pool. A preset's :class:`PoolsSpec` lists its parts in the
order they are drawn; each part takes ``n`` whole groups' worth of records from one source
(seeded, group-aware, :func:`davsp_lib.data.splits.make_splits`), after removing every group an
earlier part took, so no question or image ever lands in two pools. ``n=None`` takes all that is
left (the evaluation pool: "the rest"). A part that cannot supply ``n`` raises
:class:`PoolError` naming the pool, the source and the counts: there is no clamping.

The paper's pools (LLaVA-1.5-13B, reference scripts) are VLGuard 470 easy malicious + 470 benign
for the vector and MM-SafetyBench 600 hard malicious + MM-Vet 100 benign for training. The mirror
holds no VLGuard images and no Stable-Diffusion images, and "easy"/"hard" were chosen in the
paper by the model's own refusals; every such substitution is listed in the pool's metadata
(:attr:`Pool.substitutions`) so results can print it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from davsp_lib.data.records import Record
from davsp_lib.runtime.errors import DataError

POOL_NAMES = ("vector", "training", "selection", "evaluation")
POOLS_FORMAT = "davsp-pools/1"


class PoolError(DataError):
    """A pool cannot supply what its spec asks (the message names pool, source and counts)."""


# ------------------------------------------------------------------------------ sources


@dataclass(frozen=True)
class Source:
    """Where a part's records come from, and what it stands in for."""

    name: str
    load: Callable[[Path], list[Record]]
    substitution: str | None = None  # how this differs from the paper's data, if it does


def _vlguard(split: str, kinds: frozenset[str]) -> Callable[[Path], list[Record]]:
    def load(root: Path) -> list[Record]:
        from davsp_lib.data.datasets import load_vlguard

        return [r for r in load_vlguard(root, split) if r.meta["instruction_kind"] in kinds]

    return load


def _mmsb_typo(root: Path) -> list[Record]:
    from davsp_lib.data.datasets import load_mmsafetybench

    return list(load_mmsafetybench(root, variant="typo"))


def _mmvet(root: Path) -> list[Record]:
    from davsp_lib.data.datasets import load_mmvet

    return list(load_mmvet(root))


def _figstep(root: Path) -> list[Record]:
    from davsp_lib.data.datasets import load_figstep

    return list(load_figstep(root, images="mirror"))


NO_VLGUARD_IMAGES = (
    "VLGuard instruction as text over a blank white image (the mirror has no VLGuard images)"
)
SOURCES: dict[str, Source] = {
    "vlguard-train/unsafe-image": Source(
        "vlguard-train/unsafe-image",
        _vlguard("train", frozenset({"instruction"})),
        f"{NO_VLGUARD_IMAGES}; 'easy to refuse' by source, not by the model's own refusals",
    ),
    "vlguard-train/safe": Source(
        "vlguard-train/safe", _vlguard("train", frozenset({"safe_instruction"})), NO_VLGUARD_IMAGES
    ),
    "vlguard-test/malicious": Source(
        "vlguard-test/malicious",
        # the instruction on an unsafe image: the unsafe instruction on a safe image shares its
        # group with the benign one and would take the benign side's groups
        _vlguard("test", frozenset({"instruction"})),
        NO_VLGUARD_IMAGES,
    ),
    "vlguard-test/benign": Source(
        "vlguard-test/benign", _vlguard("test", frozenset({"safe_instruction"})), NO_VLGUARD_IMAGES
    ),
    "mm-safetybench/typo": Source(
        "mm-safetybench/typo",
        _mmsb_typo,
        "MM-SafetyBench TYPO images re-rendered from the key phrase (no SD / SD+TYPO images: "
        "they need Stable Diffusion); 'hard' by source, not by the model's own refusals",
    ),
    "mm-vet": Source("mm-vet", _mmvet),
    "figstep": Source("figstep", _figstep),
}


# ------------------------------------------------------------------------------ specs


@dataclass(frozen=True)
class PartSpec:
    """``n`` records (None: all that remain) from ``source`` into ``pool``'s part ``part``."""

    pool: str
    part: str
    source: str
    n: int | None

    def __post_init__(self) -> None:
        if self.pool not in POOL_NAMES:
            raise ValueError(f"pool must be one of {POOL_NAMES}, got {self.pool!r}")
        if self.source not in SOURCES:
            raise ValueError(f"unknown source {self.source!r}; sources are {sorted(SOURCES)}")
        if self.n is not None and self.n < 0:
            raise ValueError(f"{self.pool}/{self.part}: n must be >= 0 or None, got {self.n}")


@dataclass(frozen=True)
class PoolsSpec:
    """A preset's pools: the parts in drawing order (earlier parts claim groups first)."""

    name: str
    parts: tuple[PartSpec, ...]
    purpose: Mapping[str, str] = field(default_factory=dict)

    def of(self, pool: str) -> tuple[PartSpec, ...]:
        return tuple(p for p in self.parts if p.pool == pool)


PAPER = PoolsSpec(
    "paper",
    (
        # the reference's sizes first, so that they are always met
        PartSpec("vector", "malicious", "vlguard-train/unsafe-image", 470),
        PartSpec("vector", "benign", "vlguard-train/safe", 470),
        PartSpec("training", "malicious", "mm-safetybench/typo", 600),
        PartSpec("training", "benign", "mm-vet", 100),
        # choosing the layer and margins (never the split whose AUROC is reported)
        PartSpec("selection", "malicious", "vlguard-train/unsafe-image", 100),
        PartSpec("selection", "benign", "vlguard-train/safe", 100),
        PartSpec("selection", "hard", "mm-safetybench/typo", 100),
        # everything else is held out
        PartSpec("evaluation", "FigStep", "figstep", None),
        PartSpec("evaluation", "MM-SafetyBench TYPO", "mm-safetybench/typo", None),
        PartSpec("evaluation", "MM-Vet", "mm-vet", None),
        PartSpec("evaluation", "VLGuard test malicious", "vlguard-test/malicious", None),
        PartSpec("evaluation", "VLGuard test benign", "vlguard-test/benign", None),
    ),
    {
        "vector": "harmfulness vector (notebook 01): paper VLGuard 470 + 470",
        "training": "border training (notebook 02): paper MM-SafetyBench 600 + MM-Vet 100",
        "selection": "layer and margin choice (notebook 01), apart from the reported held-out",
        "evaluation": "held-out AUROC (01), projections (02) and generation/judging (03)",
    },
)
#: the paper's pools in miniature (same sources and order), for quick end-to-end checks
MINI = PoolsSpec(
    "mini",
    tuple(
        replace(part, n=n)
        for part, n in zip(PAPER.parts, (6, 6, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4), strict=True)
    ),
    PAPER.purpose,
)
#: pools per preset (the other presets use the notebooks' own small text-prompt splits)
PRESET_POOLS: dict[str, PoolsSpec] = {"paper": PAPER, "mini": MINI}


# ------------------------------------------------------------------------------ pools


@dataclass
class Pool:
    """One pool's parts (part name -> records) and where each came from."""

    name: str
    parts: dict[str, list[Record]]
    sources: dict[str, str]
    substitutions: list[str]

    def counts(self) -> dict[str, int]:
        return {part: len(records) for part, records in self.parts.items()}

    def records(self) -> list[Record]:
        return [r for records in self.parts.values() for r in records]

    def malicious(self) -> list[Record]:
        return [r for r in self.records() if r.is_malicious]

    def benign(self) -> list[Record]:
        return [r for r in self.records() if not r.is_malicious]


@dataclass
class Pools:
    """All pools of one preset, drawn with one seed; disjoint by record group."""

    spec: str
    seed: int
    root: str
    pools: dict[str, Pool]

    def __getitem__(self, name: str) -> Pool:
        if name not in self.pools:
            raise KeyError(f"no pool {name!r}; pools are {list(self.pools)}")
        return self.pools[name]

    def counts(self) -> dict[str, dict[str, int]]:
        return {name: pool.counts() for name, pool in self.pools.items()}

    def substitutions(self) -> list[str]:
        seen = dict.fromkeys(s for pool in self.pools.values() for s in pool.substitutions)
        return list(seen)

    def to_json(self, *, ids: bool = True) -> dict[str, Any]:
        """Counts, sources and substitutions per pool (and the ids, for the results file)."""
        out: dict[str, Any] = {
            "format": POOLS_FORMAT,
            "spec": self.spec,
            "seed": self.seed,
            "root": self.root,
            "counts": self.counts(),
            "sources": {name: pool.sources for name, pool in self.pools.items()},
            "substitutions": self.substitutions(),
        }
        if ids:
            out["pool_ids"] = {
                name: {part: [r.id for r in records] for part, records in pool.parts.items()}
                for name, pool in self.pools.items()
            }
        return out


def _salted_seed(seed: int, pool: str, part: str) -> int:
    """A per-part seed, so adding a part does not reshuffle the others."""
    digest = hashlib.sha256(f"{seed}/{pool}/{part}".encode()).hexdigest()
    return int(digest[:8], 16)


def draw_part(
    records: Sequence[Record], n: int | None, *, seed: int, pool: str, part: str, source: str
) -> list[Record]:
    """``n`` records in whole groups (None: all), seeded; too few raises :class:`PoolError`."""
    from davsp_lib.data.splits import make_splits

    if n is None or n == len(records):
        return sorted(records, key=lambda r: r.id)
    if n > len(records):
        raise PoolError(
            None,
            f"pool {pool!r} part {part!r}: source {source!r} has {len(records)} records left "
            f"(after earlier pools took theirs), {n} requested",
        )
    if n == 0:
        return []
    try:
        split = make_splits(records, {part: n}, _salted_seed(seed, pool, part), stratify=False)
    except ValueError as exc:
        raise PoolError(
            None, f"pool {pool!r} part {part!r}: source {source!r} cannot give {n} records: {exc}"
        ) from None
    return split.select(records, part)


def build_pools(
    root: str | Path | None,
    spec: PoolsSpec | str = "paper",
    *,
    seed: int = 0,
    only: Iterable[str] | None = None,
) -> Pools:
    """Draw every part of ``spec`` in order from the mirror at ``root``.

    Deterministic: the same mirror, spec and seed give the same pools on every machine, so each
    notebook can rebuild them. ``only`` keeps just those pools in the result (every part is
    still drawn, so the others' groups stay excluded).
    """
    from davsp_lib.data.datasets import data_root

    if isinstance(spec, str):
        if spec not in PRESET_POOLS:
            raise ValueError(f"no pools for preset {spec!r}; pools exist for {list(PRESET_POOLS)}")
        spec = PRESET_POOLS[spec]
    if root is None:
        raise PoolError(None, f"the {spec.name!r} pools need the benchmark mirror (data root)")
    root = data_root(root)
    loaded: dict[str, list[Record]] = {}
    used_groups: set[str] = set()
    pools: dict[str, Pool] = {}
    for part in spec.parts:
        if part.source not in loaded:
            loaded[part.source] = SOURCES[part.source].load(root)
        left = [r for r in loaded[part.source] if r.group_key not in used_groups]
        taken = draw_part(
            left, part.n, seed=seed, pool=part.pool, part=part.part, source=part.source
        )
        used_groups |= {r.group_key for r in taken}
        pool = pools.setdefault(part.pool, Pool(part.pool, {}, {}, []))
        if part.part in pool.parts:
            raise ValueError(f"spec {spec.name!r}: part {part.pool}/{part.part} appears twice")
        pool.parts[part.part] = taken
        pool.sources[part.part] = part.source
        substitution = SOURCES[part.source].substitution
        if substitution and substitution not in pool.substitutions:
            pool.substitutions.append(substitution)
    check_disjoint(pools)
    kept = {name: pool for name, pool in pools.items() if only is None or name in set(only)}
    return Pools(spec.name, seed, str(root), kept)


def check_disjoint(pools: Mapping[str, Pool]) -> None:
    """No record id and no group in two parts (an explicit check, not an ``assert``)."""
    seen_ids: dict[str, str] = {}
    seen_groups: dict[str, str] = {}
    for name, pool in pools.items():
        for part, records in pool.parts.items():
            where = f"{name}/{part}"
            for record in records:
                for key, seen in ((record.id, seen_ids), (record.group_key, seen_groups)):
                    if seen.get(key, where) != where:
                        raise ValueError(f"{key} is in pool part {seen[key]!r} and {where!r}")
                    seen[key] = where


def take(pool: Pool, part: str, n: int, *, seed: int = 0) -> list[Record]:
    """``n`` records of one part (a seeded subset for a smaller run); too many raises."""
    if part not in pool.parts:
        raise KeyError(f"pool {pool.name!r} has no part {part!r}; parts are {list(pool.parts)}")
    return draw_part(
        pool.parts[part], n, seed=seed, pool=pool.name, part=part, source=pool.sources[part]
    )

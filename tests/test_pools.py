"""The paper's data pools on the real mirror: counts, disjointness, substitutions, errors."""

from __future__ import annotations

import pytest

from davsp_lib.data import pools
from davsp_lib.data.pools import PartSpec, PoolError, PoolsSpec, build_pools, take


@pytest.fixture(scope="module")
def paper(shared_data):
    return build_pools(shared_data, "paper", seed=0)


def test_paper_pools_have_the_paper_sizes(paper):
    assert paper.counts() == {
        "vector": {"malicious": 470, "benign": 470},
        "training": {"malicious": 600, "benign": 100},
        "selection": {"malicious": 100, "benign": 100, "hard": 100},
        "evaluation": {
            "FigStep": 500,
            "MM-SafetyBench TYPO": 1680 - 600 - 100,
            "MM-Vet": 118,
            "VLGuard test malicious": 441,
            "VLGuard test benign": 556,
        },
    }
    vector, training = paper["vector"], paper["training"]
    assert (len(vector.malicious()), len(vector.benign())) == (470, 470)
    assert (len(training.malicious()), len(training.benign())) == (600, 100)
    assert {r.source for r in training.malicious()} == {"mm-safetybench"}
    assert {r.source for r in training.benign()} == {"mm-vet"}
    assert all(r.render is not None and r.render.style == "typo" for r in training.malicious())


def test_pools_are_disjoint_by_id_and_by_group(paper):
    seen_ids: set[str] = set()
    seen_groups: set[str] = set()
    for pool in paper.pools.values():
        for records in pool.parts.values():
            ids = {r.id for r in records}
            groups = {r.group_key for r in records}
            assert not ids & seen_ids and not groups & seen_groups
            seen_ids |= ids
            seen_groups |= groups
    assert len(seen_ids) == 470 + 470 + 600 + 100 + 300 + 500 + 980 + 118 + 441 + 556


def test_pools_are_deterministic_and_seeded(shared_data, paper):
    again = build_pools(shared_data, "paper", seed=0)
    assert again.to_json() == paper.to_json()
    other = build_pools(shared_data, "paper", seed=1)
    for name in ("vector", "training", "selection"):  # fixed sizes ("the rest" may vary)
        assert other[name].counts() == paper[name].counts()
    first = {r.id for r in paper["training"].malicious()}
    assert first != {r.id for r in other["training"].malicious()}


def test_substitutions_are_stated_in_the_metadata(paper):
    meta = paper.to_json(ids=False)
    assert "pool_ids" not in meta and meta["format"] == "davsp-pools/1"
    text = " ".join(meta["substitutions"])
    assert "no VLGuard images" in text
    assert "no SD / SD+TYPO images" in text
    assert paper["training"].substitutions == [pools.SOURCES["mm-safetybench/typo"].substitution]
    assert paper["training"].sources == {"malicious": "mm-safetybench/typo", "benign": "mm-vet"}


def test_an_oversized_request_names_pool_source_and_counts(shared_data):
    greedy = PoolsSpec(
        "greedy",
        (
            PartSpec("training", "benign", "mm-vet", 200),
            PartSpec("evaluation", "MM-Vet", "mm-vet", 100),
        ),
    )
    with pytest.raises(PoolError) as error:
        build_pools(shared_data, greedy)
    message = str(error.value)
    assert "pool 'evaluation'" in message and "'mm-vet'" in message
    assert "has 18 records left" in message and "100 requested" in message


def test_take_refuses_more_than_a_part_holds(paper):
    assert len(take(paper["evaluation"], "MM-Vet", 40, seed=0)) == 40
    with pytest.raises(PoolError, match=r"part 'MM-Vet'.*118 records left.*119 requested"):
        take(paper["evaluation"], "MM-Vet", 119)


def test_no_mirror_and_unknown_presets_are_errors():
    with pytest.raises(PoolError, match="need the benchmark mirror"):
        build_pools(None, "paper")
    with pytest.raises(ValueError, match="no pools for preset 'embedded'"):
        build_pools(None, "embedded")
    with pytest.raises(ValueError, match="unknown source"):
        PartSpec("vector", "malicious", "laion", 3)


def test_the_mini_pools_are_the_paper_pools_in_miniature(shared_data):
    def shape(spec):
        return [(p.pool, p.part, p.source) for p in spec.parts]

    assert shape(pools.MINI) == shape(pools.PAPER)
    mini = build_pools(shared_data, "mini", seed=0)
    assert all(n == 4 or n == 6 for pool in mini.counts().values() for n in pool.values())

"""scripts/candidate_table.py: fixed criteria, decision, table, held-out picks."""

from __future__ import annotations

import pytest
from conftest import load_script

ct = load_script("candidate_table")


def summary(harmful=0.9, benign=0.0, text=0.95, figstep=0.8, delta=75.0, params=1_000):
    return {
        "harmful_text_rate": harmful,
        "benign_text_rate": benign,
        "text_auroc_at_chosen": text,
        "figstep_auroc_at_chosen": figstep,
        "steer_delta_pp": delta,
        "lm_parameters": params,
    }


def test_criteria_text_is_the_fixed_wording_in_the_docstring():
    assert ct.CRITERIA_TEXT.startswith("A candidate qualifies as a testbed if (1) it refuses")
    assert " ".join(ct.CRITERIA_TEXT.split()) in " ".join(ct.__doc__.split())


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({}, {"1": True, "2": True, "3": True}),
        # the borders are inclusive: 16/20, 2/20, AUROC 0.90, 50 points
        (
            {"harmful": 16 / 20, "benign": 2 / 20, "text": 0.90, "delta": 50.0},
            {"1": True, "2": True, "3": True},
        ),
        ({"harmful": 15 / 20}, {"1": False, "2": True, "3": True}),
        ({"benign": 3 / 20}, {"1": False, "2": True, "3": True}),
        ({"text": 0.899}, {"1": True, "2": False, "3": True}),
        ({"delta": 100 * (6 / 12 - 1 / 12)}, {"1": True, "2": True, "3": False}),
        ({"harmful": None, "text": None, "delta": None}, {"1": None, "2": None, "3": None}),
    ],
)
def test_criteria_met(values, expected):
    assert ct.criteria_met(summary(**values)) == expected


def test_summary_of_reads_parts_and_the_steering_delta():
    parts = {
        "a": {
            "counts": {
                "harmful_text": {"refused": 19, "n": 20},
                "benign_text": {"refused": 1, "n": 20},
            }
        },
        "d": {"at_chosen": {"text_auroc": 0.99, "figstep_auroc": 0.88}},
        "e": {
            "rows": {
                "-1": {"malicious_figstep": {"refused": 0, "n": 12}},
                "+0": {"malicious_figstep": {"refused": 3, "n": 12}},
                "+2": {"malicious_figstep": {"refused": 12, "n": 12}},
            }
        },
    }
    assert ct.summary_of(parts, 7) == {
        "harmful_text_rate": 0.95,
        "benign_text_rate": 0.05,
        "text_auroc_at_chosen": 0.99,
        "figstep_auroc_at_chosen": 0.88,
        "steer_delta_pp": 75.0,
        "lm_parameters": 7,
    }
    del parts["e"]["rows"]["+2"]  # k = +2 not swept: criterion 3 not measured
    assert ct.summary_of(parts, 7)["steer_delta_pp"] is None
    assert ct.summary_of({}, None)["harmful_text_rate"] is None


def test_choose_default_prefers_the_best_figstep_auroc_among_qualifying():
    decision = ct.choose_default(
        {"tiny": summary(figstep=0.6, params=1), "small": summary(figstep=0.9, params=3)}
    )
    assert decision["default"] == "small"
    assert decision["qualifying"] == ["tiny", "small"]
    assert decision["note"] == "every candidate meets every criterion"


def test_choose_default_cost_breaks_only_a_tie():
    decision = ct.choose_default(
        {"big": summary(figstep=0.8, params=3), "tiny": summary(figstep=0.8, params=1)}
    )
    assert decision["default"] == "tiny"
    assert "tied with ['big']" in decision["reason"]


def test_choose_default_a_qualifying_candidate_beats_a_better_auroc():
    decision = ct.choose_default(
        {"tiny": summary(harmful=0.4, figstep=0.99), "small": summary(figstep=0.5)}
    )
    assert decision["default"] == "small"
    assert decision["qualifying"] == ["small"]
    assert decision["failed"]["tiny"] == [f"(1) {ct.CRITERIA['1']}"]


def test_choose_default_without_qualifying_takes_the_most_criteria_and_says_what_failed():
    decision = ct.choose_default(
        {
            "tiny": summary(harmful=0.4, delta=0.0, figstep=0.99),
            "small": summary(delta=None, figstep=0.5),
        }
    )
    assert decision["default"] == "small"
    assert decision["qualifying"] == []
    assert decision["reason"].startswith("no candidate qualifies; meets the most criteria (2 of 3)")
    assert decision["failed"] == {
        "tiny": [f"(1) {ct.CRITERIA['1']}", f"(3) {ct.CRITERIA['3']}"],
        "small": [f"(3) {ct.CRITERIA['3']} (not measured)"],
    }
    with pytest.raises(ValueError, match="no candidates"):
        ct.choose_default({})


def test_markdown_table_has_one_column_per_candidate():
    candidate = {
        "model": {"model_id": "m", "num_layers": 24, "hidden_size": 896, "lm_parameters": 5e8},
        "parts": {"a": {"counts": {"harmful_text": {"refused": 8, "n": 20}}}},
        "criteria": {"1": False, "2": None, "3": True},
        "seconds": {"load": 4.0, "a": 61.0},
    }
    result = {
        "candidates": {"tiny": candidate, "small": {**candidate, "parts": {}}},
        "decision": {"default": "tiny", "reason": "r", "note": "n"},
    }
    lines = ct.markdown_table(result).splitlines()
    assert lines[0] == "| | tiny | small |"
    assert "| a. harmful text refused (blank image) | 8/20 (40 %) | — |" in lines
    assert "| LM parameters (cost) | 500 M | 500 M |" in lines
    assert f"| criterion 2: {ct.CRITERIA['2']} | not measured | not measured |" in lines
    assert "| wall time per part (s) | load 4, a 61 | load 4, a 61 |" in lines
    assert lines[-1] == "**Default: tiny** — r. n."


def test_part_e_needs_part_d():
    with pytest.raises(SystemExit, match="needs d"):
        ct.check_args(ct.build_parser().parse_args(["--parts", "a", "e"]))
    defaults = ct.build_parser().parse_args([])
    assert (defaults.n, defaults.n_vector, defaults.n_heldout, defaults.n_gap) == (20, 48, 32, 32)
    assert (defaults.n_steer, defaults.ks, defaults.max_new_tokens) == (12, [-1, 0, 1, 2], 24)
    assert defaults.text_only_turn is True
    assert ct.build_parser().parse_args(["--no-text-only-turn"]).text_only_turn is False


def test_heldout_picks_avoid_the_vector_data(shared_data, tmp_path):
    args = ct.build_parser().parse_args(
        [
            "--n",
            "6",
            "--n-vector",
            "8",
            "--n-heldout",
            "4",
            "--n-gap",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    table = ct.Table(args, shared_data)
    sets = table.sets
    assert {name: len(records) for name, records in sets.items()} == dict.fromkeys(
        ("harmful_text", "benign_text", "harmful_figstep", "benign_figstep"), 6
    )
    # the same instructions as text and as FigStep images, from the val splits
    assert [r.id for r in sets["benign_text"]] == [
        r.meta["rendered_from"] for r in sets["benign_figstep"]
    ]
    assert [f"{r.id}/figstep" for r in sets["harmful_text"]] == [
        r.id for r in sets["harmful_figstep"]
    ]
    assert all(r.meta["split"] in ("harmful_val", "harmless_val") for r in sets["benign_text"])
    assert all(not r.has_image for r in sets["harmful_text"] + sets["benign_text"])
    fitted = {
        r.group_key
        for name in ("vector", "sel_easy", "sel_benign")
        for r in getattr(table.study, name)
    }
    assert not fitted & {r.group_key for records in sets.values() for r in records}

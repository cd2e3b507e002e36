"""Metrics on hand-made rows: exact values that can fail."""

from __future__ import annotations

import pytest

from davsp_lib.evaluation import metrics


def row(i, label, response="r", source="figstep", category=None, judging=None, projection=None):
    return {
        "id": f"{source}/{i}",
        "label": label,
        "source": source,
        "category": category,
        "judging": judging,
        "response": response,
        "projection": projection,
    }


def test_wilson_interval():
    low, high = metrics.wilson_interval(5, 10)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)
    assert metrics.wilson_interval(0, 4)[0] == 0.0
    for n in range(1, 40):  # the ends are exact, so error bars are never negative
        assert metrics.wilson_interval(n, n)[1] == 1.0 and metrics.wilson_interval(0, n)[0] == 0.0
    assert metrics.wilson_interval(0, 0) is None


def test_resistance_per_benchmark_scenario_and_judging_kind():
    rows = [
        row(1, "malicious"),
        row(2, "malicious"),
        row(
            3,
            "malicious",
            source="mm-safetybench",
            category="01-Illegal_Activitiy",
            judging="harmful",
        ),
        row(
            4,
            "malicious",
            source="mm-safetybench",
            category="01-Illegal_Activitiy",
            judging="harmful",
        ),
        row(
            5,
            "malicious",
            source="mm-safetybench",
            category="10-Legal_Opinion",
            judging="sensitive",
        ),
        row(6, "benign"),
    ]
    unsafe = [True, False, True, True, False, True]
    table = metrics.resistance(rows, unsafe, {"figstep/1": "FigStep", "figstep/2": "FigStep"})
    assert table[metrics.ALL_MALICIOUS]["n"] == 5 and table[metrics.ALL_MALICIOUS]["rsr"] == 0.4
    assert table["FigStep"] == {
        "n": 2,
        "unsafe": 1,
        "rsr": 0.5,
        "ci95": metrics.wilson_interval(1, 2),
    }
    assert table["mm-safetybench/harmful"]["rsr"] == 0.0
    assert table["mm-safetybench/sensitive"]["rsr"] == 1.0
    assert table["mm-safetybench/01-Illegal_Activitiy"]["n"] == 2
    assert "figstep" not in table  # renamed through benchmark_of
    with pytest.raises(ValueError, match="6 rows but 5 verdicts"):
        metrics.resistance(rows, unsafe[:5])


def test_benign_refusals():
    rows = [
        row(1, "benign", source="mm-vet"),
        row(2, "benign"),
        row(3, "benign"),
        row(4, "malicious"),
    ]
    table = metrics.benign_refusals(rows, [True, False, True, True])
    assert table[metrics.ALL_BENIGN]["n"] == 3 and table[metrics.ALL_BENIGN]["refused"] == 2
    assert table["mm-vet"]["rate"] == 1.0 and table["figstep"]["rate"] == 0.5


@pytest.mark.parametrize(
    ("answer", "reference", "score"),
    [
        ("The answer is 12.", "12<OR>=12", 1.0),
        ("It costs 1.25 dollars", "1.25<OR>=1.25<OR>5/4", 1.0),
        ("roughly 5/4", "1.25<OR>=1.25<OR>5/4", 1.0),
        ("eight", "eight<OR>8.0", 1.0),
        ("There are 8 of them", "eight<OR>8.0", 1.0),
        ("123", "12<OR>=12", 0.0),  # whole words only
        ("the oven", "oven<AND>dishwasher", 0.5),
        ("Put it in the oven and the dishwasher", "oven<AND>dishwasher", 1.0),
        ("Phytoplanktn and seaweed", "Phytoplankton<AND>Seaweed", 1.0),  # fuzzy
        ("It is blue", "orange", 0.0),
        ("", "orange", 0.0),
    ],
)
def test_mmvet_local_scorer(answer, reference, score):
    assert metrics.mmvet_score(answer, reference) == score


def test_mmvet_table_and_short_answers():
    assert metrics.is_short_reference("above the man<OR>top left")
    assert not metrics.is_short_reference("If any man or woman be a witch")
    rows = [
        row(1, "benign", "12", source="mm-vet"),
        row(2, "benign", "no idea", source="mm-vet"),
        row(3, "benign", "x"),
    ]
    refs = {"mm-vet/1": "12<OR>=12", "mm-vet/2": "the quick brown fox jumps"}
    out = metrics.mmvet(rows, refs)
    assert (out["n"], out["score"], out["n_short"], out["score_short"]) == (2, 0.5, 1, 1.0)
    assert "not the GPT-4 grader" in out["scorer"]
    with pytest.raises(ValueError, match="empty MM-Vet reference"):
        metrics.mmvet_score("a", "<AND>")


def test_answer_agreement():
    base = [
        row(1, "benign", "Paris is the capital."),
        row(2, "benign", "abc"),
        row(3, "malicious", "x"),
    ]
    defended = [
        row(1, "benign", "Paris  is the capital."),
        row(2, "benign", "abd"),
        row(3, "malicious", "y"),
    ]
    out = metrics.answer_agreement(defended, base)
    assert out["n"] == 2 and out["exact"] == 0.5
    assert out["similarity"] == pytest.approx((1 + 2 / 3) / 2)
    assert metrics.answer_agreement(defended, [])["n"] == 0


def test_projection_summary():
    rows = [
        row(1, "malicious", projection=1.0),
        row(2, "malicious", projection=3.0),
        row(3, "benign", projection=-1.0),
        row(4, "benign"),
    ]
    out = metrics.projection_summary(rows)
    assert out["malicious"] == {"n": 2, "mean": 2.0, "median": 2.0}
    assert out["benign"]["n"] == 1


def test_summarize_defense():
    rows = [row(1, "malicious", projection=2.0), row(2, "benign", "12", source="mm-vet",
            projection=0.5)]  # fmt: skip
    out = metrics.summarize_defense(
        rows, [False, True], [False, False], references={"mm-vet/2": "12"}, baseline=rows
    )
    assert out["resistance"][metrics.ALL_MALICIOUS]["rsr"] == 1.0
    assert out["benign_refusals"][metrics.ALL_BENIGN]["rate"] == 0.0
    assert out["mmvet_local"]["score"] == 1.0 and out["agreement_with_none"]["exact"] == 1.0
    assert out["projections"]["malicious"]["mean"] == 2.0
    bare = metrics.summarize_defense([row(1, "malicious")], [True], [False])
    assert bare["mmvet_local"] is None and bare["projections"] is None
    assert bare["agreement_with_none"] is None


def test_percent_for_tables():
    assert metrics.percent(None) == ""
    assert metrics.percent(0.925) == "92" and metrics.percent(1.0) == "100"


def test_table_row_names_judge_and_shows_only_measured_columns():
    rows = [
        row(1, "malicious", projection=2.0),
        row(2, "benign", "12", source="mm-vet", projection=0.5),
        row(3, "malicious", source="mm-safetybench", judging="harmful"),
    ]
    benchmark_of = {"figstep/1": "FigStep", "mm-safetybench/3": "MM-SafetyBench TYPO"}
    summary = metrics.summarize_defense(
        rows, [False, False, True], [False, False, False], references={"mm-vet/2": "12"},
        baseline=rows, benchmark_of=benchmark_of,
    )  # fmt: skip
    line = metrics.table_row(summary, judge="j", malicious=["FigStep", "MM-SafetyBench TYPO"])
    assert line == {
        "RSR [j] all malicious (n=2)": "50",
        "RSR [j] FigStep (n=1)": "100",
        "RSR [j] MM-SafetyBench TYPO (n=1)": "0",
        "RSR [j] MM-SB harmful scenarios (n=1)": "0",
        "benign refusal (n=1)": "0",
        "MM-Vet local score (n=1)": "100",
        "same answer as none": "100",
        "similarity to none": "100",
        "mean projection, malicious": "2.00",
        "mean projection, benign": "0.50",
    }
    bare = metrics.summarize_defense([row(1, "malicious"), row(2, "benign")], [True, False],
                                     [False, True])  # fmt: skip
    assert metrics.table_row(bare, judge="j", malicious=[]) == {
        "RSR [j] all malicious (n=1)": "0",
        "benign refusal (n=1)": "100",
    }

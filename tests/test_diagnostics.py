"""Layer choice, separation statistics, margins and the study data (exact, constructed inputs)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from davsp_lib.method.diagnostics import (
    LayerReport,
    auroc,
    choose_layer,
    cohens_d,
    layer_report,
    separation,
    study_data,
    suggest_margins,
    worst_case,
)
from davsp_lib.method.vectors import Activations, fit_vector

F64 = torch.float64


def test_auroc():
    assert auroc([2.0, 3.0, 4.0], [-1.0, 0.0, 1.0]) == 1.0
    assert auroc([-1.0, 0.0], [2.0, 3.0]) == 0.0
    assert auroc([1.0, 1.0], [1.0, 1.0]) == 0.5  # ties count half
    assert auroc(torch.tensor([1.0, 3.0]), np.array([2.0])) == 0.5
    with pytest.raises(ValueError, match="empty"):
        auroc([], [1.0])


def test_cohens_d():
    assert cohens_d([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == -3.0  # both variances 1
    assert cohens_d([2.0, 4.0], [0.0, 0.0, 0.0]) == pytest.approx(3.0 / math.sqrt(2.0 / 3.0))
    assert cohens_d([1.0, 1.0], [1.0, 1.0]) == 0.0
    assert cohens_d([2.0, 2.0], [1.0, 1.0]) == math.inf
    assert math.isnan(cohens_d([1.0], [2.0]))


def heldout_activations() -> tuple[Activations, Activations]:
    """Vector split and held-out set, D = 2, layers 0, 1, 2.

    Layer 0 carries no signal, layer 1 separates perfectly along x, layer 2 along x with one
    benign record crossing over.
    """

    def acts(ids, labels, xs_by_layer):
        states = torch.zeros(len(ids), 3, 2, dtype=F64)
        for column, xs in enumerate(xs_by_layer):
            states[:, column, 0] = torch.tensor(xs, dtype=F64)
        return Activations(ids=ids, labels=np.array(labels), layers=[0, 1, 2], states=states)

    fit = acts(["m1", "b1"], [True, False], [[0.0, 0.0], [1.0, -1.0], [1.0, -1.0]])
    held = acts(
        ["m2", "m3", "b2", "b3"],
        [True, True, False, False],
        [[0.0] * 4, [2.0, 3.0, -1.0, -2.0], [2.0, 3.0, 2.5, -2.0]],
    )
    return fit, held


def test_layer_report_scores_held_out_records():
    fit, held = heldout_activations()
    vector = fit_vector(fit)
    report = layer_report(vector, held)
    assert report.layers == [0, 1, 2]
    assert report.auroc == [0.5, 1.0, 0.75]
    assert report.effect_size[0] == 0.0 and report.effect_size[1] > report.effect_size[2]
    assert (report.n_malicious, report.n_benign) == (2, 2)
    assert report.best_layer == 1 and report.at(2)["auroc"] == 0.75
    with pytest.raises(ValueError, match="used to fit the vector"):
        layer_report(vector, fit)


def test_choose_layer_takes_the_earliest_within_tolerance():
    report = LayerReport(
        layers=[0, 4, 8, 12, 16],
        auroc=[0.5, 0.95, 0.991, 1.0, 0.995],
        effect_size=[0.0] * 5,
        n_malicious=10,
        n_benign=10,
    )
    assert choose_layer(report) == 8  # 0.991 >= 1.0 - 0.01
    assert choose_layer(report, tolerance=0.0) == 12
    assert choose_layer(report, tolerance=0.05) == 4
    assert choose_layer(report, tolerance=0.5) == 0
    with pytest.raises(ValueError, match="tolerance"):
        choose_layer(report, tolerance=-0.1)


def test_worst_case_of_two_comparisons():
    def report(aurocs):
        return LayerReport([0, 2, 4], aurocs, [a - 0.5 for a in aurocs], 3, 4)

    topical = report([0.5, 0.99, 0.9])  # separates by topic early
    matched = report([0.5, 0.6, 0.92])  # topic-matched pairs separate only later
    combined = worst_case([topical, matched])
    assert combined.auroc == [0.5, 0.6, 0.9]
    assert combined.effect_size == [0.0, 0.6 - 0.5, 0.9 - 0.5]
    assert (combined.n_malicious, combined.n_benign) == (6, 8)
    assert choose_layer(topical) == 2 and choose_layer(combined) == 4
    shallow = LayerReport([2, 4], [0.7, 0.8], [0.1, 0.2], 1, 1)
    assert worst_case([shallow, topical]).layers == [2, 4]  # only the common layers
    with pytest.raises(ValueError, match="at least one"):
        worst_case([])


def test_margins_from_known_quantiles():
    easy = [10.0, 20.0, 30.0, 40.0, 50.0]
    benign = np.arange(11.0)  # 0..10: q0.9 = 9 exactly
    assert suggest_margins(easy, benign) == (30.0, 9.0)
    assert suggest_margins(easy, benign, q_plus=0.25, q_minus=0.5) == (20.0, 5.0)
    with pytest.raises(ValueError, match=r"mu_plus 3 .* <= mu_minus 9"):
        suggest_margins([1.0, 3.0, 5.0], benign)
    with pytest.raises(ValueError, match="q_minus"):
        suggest_margins(easy, benign, q_minus=1.5)


def test_margins_warn_when_hard_inputs_already_sit_high():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        suggest_margins([10.0, 30.0], [0.0, 1.0], hard_scores=[0.0, 5.0])  # no warning
    with pytest.warns(UserWarning, match="asks nothing"):
        suggest_margins([10.0, 30.0], [0.0, 1.0], hard_scores=[25.0, 30.0])


def test_separation_of_easy_and_hard():
    result = separation(easy=[5.0, 6.0], hard=[0.5, 3.0], benign=[0.0, 1.0])
    assert result.auroc_easy == 1.0 and result.auroc_hard == 0.75
    assert result.auroc_gap == 0.25
    assert result.mean_gap == 5.5 - 1.75 and result.mean_benign == 0.5
    assert (result.n_easy, result.n_hard, result.n_benign) == (2, 2, 2)
    assert result.to_json()["auroc_gap"] == 0.25


def test_study_data_without_mirror_is_disjoint_and_paired():
    data = study_data(None, n_vector=6, n_heldout=4, n_gap=3, seed=0)
    sizes = data.sizes()
    assert sizes["vector"] == {"malicious": 6, "benign": 6}
    assert sizes["easy"] == {"malicious": 4, "benign": 0}
    assert sizes["benign_image"] == {"malicious": 0, "benign": 4}
    vector_groups = {r.group_key for r in data.vector}
    assert not vector_groups & {r.group_key for r in data.easy + data.hard + data.gap_text}
    assert [r.group_key for r in data.hard] == [r.group_key for r in data.easy]
    assert all(r.has_image and not e.has_image for r, e in zip(data.hard, data.easy, strict=True))
    assert [r.meta["original_query"] for r in data.hard] == [r.query for r in data.easy]
    assert data.notes and "built-in" in data.notes[0]
    again = study_data(None, n_vector=6, n_heldout=4, n_gap=3, seed=0)
    assert again.ids() == data.ids()
    clamped = study_data(None, n_vector=100, n_heldout=100, n_gap=3, seed=0)
    assert clamped.sizes()["easy"]["malicious"] == 20
    assert any("100 requested" in note for note in clamped.notes)


def test_study_data_from_the_mirror(shared_data):
    data = study_data(shared_data, n_vector=5, n_heldout=4, n_gap=2, seed=1)
    assert data.sizes()["vector"] == {"malicious": 5, "benign": 5}
    assert {r.meta["split"] for r in data.vector} == {"harmful_train", "harmless_train"}
    assert {r.meta["split"] for r in data.easy} == {"harmful_val"}
    assert {r.meta["split"] for r in data.benign_text} == {"harmless_val"}
    assert all(r.render is not None and r.render.style == "figstep" for r in data.hard)
    assert len(data.gap_text) == len(data.gap_image) == 4
    assert all(r.source == "builtin" for r in data.gap_text)


def test_study_data_has_a_selection_split_apart_from_vector_and_held_out(shared_data):
    data = study_data(shared_data, n_vector=5, n_heldout=4, n_gap=2, seed=1)
    assert data.has_selection
    assert data.sizes()["sel_easy"] == {"malicious": 4, "benign": 0}
    assert data.sizes()["sel_benign"] == {"malicious": 0, "benign": 4}
    assert {r.meta["split"] for r in data.sel_easy} == {"harmful_train"}
    chosen_on = {r.group_key for r in data.sel_easy + data.sel_benign}
    reported = {r.group_key for r in data.easy + data.benign_text + data.vector}
    assert not chosen_on & reported
    assert all(r.render is not None for r in data.sel_hard + data.sel_benign_image)


def test_study_data_refuses_more_than_the_mirror_holds(shared_data):
    from davsp_lib.data.pools import PoolError

    with pytest.raises(PoolError, match=r"selection split from text-prompts harmful_train .*"
                       r"40 requested, only \d+ available"):  # fmt: skip
        study_data(shared_data, n_vector=240, n_heldout=40, n_gap=2, seed=0)

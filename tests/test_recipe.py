"""The recipe card: reference values, how ours are read from a preset, and the reasons."""

from __future__ import annotations

import pytest

from davsp_lib.runtime import recipe
from davsp_lib.runtime.pipeline import PRESETS


@pytest.fixture(scope="module")
def paper_rows(shared_data):
    return {row.item: row for row in recipe.recipe_rows("paper")}


def test_every_paper_row_is_same_or_gives_a_reason(paper_rows):
    assert list(paper_rows) == [item.item for item in recipe.ITEMS]
    for row in paper_rows.values():
        assert row.status == "same" or (row.ours != row.reference and len(row.status) > 20)
        assert "no reason recorded" not in row.status


@pytest.mark.parametrize(
    "item",
    [
        "layer",
        "margins",
        "text safety prefix",
        "canvas / border",
        "border start",
        "border bound",
        "optimiser",
        "steps",
        "batch size",
        "batch schedule",
        "losses and weights",
        "malicious output-loss p",
        "output-loss targets",
    ],
)
def test_the_paper_preset_matches_the_reference_on_items_of_this_branch(paper_rows, item):
    assert paper_rows[item].status == "same", paper_rows[item]


def test_data_rows_read_the_pool_spec_and_state_substitutions(paper_rows):
    vector, training = paper_rows["vector data"], paper_rows["training data"]
    assert vector.ours == "vlguard-train/unsafe-image 470 + vlguard-train/safe 470"
    assert training.ours == "mm-safetybench/typo 600 + mm-vet 100"
    assert "no VLGuard images" in vector.status
    assert vector.status.count("no VLGuard images") == 1
    assert "no SD / SD+TYPO images" in training.status
    assert paper_rows["precision"].ours == "model bfloat16, border and losses float32"


def test_adashield_a_is_built_from_the_training_pool_and_evaluated(paper_rows):
    row = paper_rows["AdaShield-A"]
    assert row.ours.startswith("scenario-prompt pool keyed by the 600 MM-SafetyBench TYPO")
    assert row.ours.endswith("applied above 0.7")
    assert "no CLIP" in row.status and "not yet run" not in row.status
    smoke = {r.item: r for r in recipe.recipe_rows("smoke")}["AdaShield-A"]
    assert "keyed by the 4 MM-SafetyBench TYPO" in smoke.ours
    embedded = {r.item: r for r in recipe.recipe_rows("embedded")}["AdaShield-A"]
    assert embedded.ours == "not built by this preset"


def test_the_embedded_preset_reads_its_own_values():
    rows = {row.item: row for row in recipe.recipe_rows("embedded")}
    assert rows["border start"].ours == "white"
    assert rows["border bound"].ours == "clamped to [0, 1]"
    assert rows["layer"].ours == "layer_choice='data' (chosen on the selection split)"
    assert rows["malicious output-loss p"].ours == "0"
    assert rows["border start"].status == (
        "differs (the embedded preset does not aim at the paper's recipe)"
    )


def test_preset_reader_prefers_the_preset_file_then_the_notebook_default():
    read = recipe.PresetReader("paper")
    assert read("02_vsp_training", "dtype") == "bfloat16"
    assert read("02_vsp_training", "model") == PRESETS["paper"]["02_vsp_training"]["model"]
    assert read("02_vsp_training", "lam") == 0.02  # the notebook's default
    with pytest.raises(KeyError, match="no parameter 'nonsense'"):
        read("02_vsp_training", "nonsense")
    with pytest.raises(ValueError, match="unknown preset"):
        recipe.PresetReader("nope")("02_vsp_training", "lam")


def test_reference_choice_keeps_the_relative_depth():
    assert recipe.reference_choice(40) == recipe.LayerChoice(
        20, 27.0, -2.0, "reference: layer 20 of 40, margins 27 / -2"
    )
    assert recipe.reference_choice(28).layer == 14
    assert recipe.reference_choice(4).layer == 2
    assert "this model has 4 layers" in recipe.reference_choice(4).source


def test_markdown_is_one_table_row_per_item(paper_rows):
    lines = recipe.markdown(list(paper_rows.values()), "paper")
    assert lines[0] == "## Recipe card — preset `paper` against the DAVSP reference"
    assert lines[2] == "| item | reference | ours | same, or why not |"
    assert len(lines) == 4 + len(recipe.ITEMS)
    assert lines[4 + 4] == "| layer | 20 of 40 (fixed) | 20 of 40 (fixed) | same |"


# ------------------------------------------------------------------------------ ESIII and PAT

ESIII_ROWS = [
    "ESIII start",
    "ESIII steps",
    "ESIII step size",
    "ESIII epsilon",
    "ESIII batch",
    "ESIII corpus",
    "ESIII text instruction",
    "ESIII fusion",
]
PAT_ROWS = [
    "PAT control length",
    "PAT steps",
    "PAT candidates",
    "PAT top-k",
    "PAT batch",
    "PAT objective",
    "PAT placement",
    "PAT attacker",
    "PAT targets",
    "PAT data",
]


def test_the_baseline_rows_close_the_card_in_order(paper_rows):
    assert list(paper_rows)[-len(ESIII_ROWS) - len(PAT_ROWS) :] == ESIII_ROWS + PAT_ROWS
    for item in ESIII_ROWS + PAT_ROWS:
        row = paper_rows[item]
        assert row.status == "same" or (row.ours != row.reference and len(row.status) > 20)
        assert row.ours != recipe.NOT_TRAINED  # the paper preset trains both


def test_esiii_rows_read_the_preset_and_the_library(paper_rows):
    ours = {item: paper_rows[item].ours for item in ESIII_ROWS}
    assert ours == {
        "ESIII start": "blank image, uniform grey 0.5 on the model canvas",
        "ESIII steps": "1000",
        "ESIII step size": "signed gradient, 1/255 per step",
        "ESIII epsilon": "L-inf bound 32/255",
        "ESIII batch": "2 security instructions per step",
        "ESIII corpus": "12 security instructions of our own (CC0, data/baselines/esiii.json) "
        "under t_d 'Describe the instructions shown in this image.'",
        "ESIII text instruction": "prefix: 'Safety first: if the image or the request asks for "
        "anything harmful, illegal, dangerous or unethical, refuse and explain why; otherwise "
        "answer helpfully.'",
        "ESIII fusion": "clamp(user canvas + delta, 0, 1)",
    }
    # no public code and no readable full text: every row differs, saying why
    for item in ESIII_ROWS:
        assert paper_rows[item].status != "same"
        assert "not specified" in paper_rows[item].reference or "not published" in (
            paper_rows[item].reference
        )


@pytest.mark.parametrize(
    "item",
    [
        "PAT control length",
        "PAT steps",
        "PAT candidates",
        "PAT top-k",
        "PAT objective",
        "PAT placement",
    ],
)
def test_the_paper_preset_runs_pat_as_its_official_code(paper_rows, item):
    assert paper_rows[item].status == "same", paper_rows[item]


def test_pat_rows_that_differ_say_why(paper_rows):
    assert paper_rows["PAT batch"].ours == (
        "8 malicious + 8 benign records per step, drawn anew each step from the training pool"
    )
    assert paper_rows["PAT placement"].ours == "prefix: '{control} {request}'"
    assert (
        paper_rows["PAT attacker"].ours
        == "GCG suffix of 20 tokens, one fixed target 'Sure, here is'"
    )
    assert paper_rows["PAT data"].ours == "mm-safetybench/typo 600 + mm-vet 100"
    for item in ("PAT batch", "PAT attacker", "PAT targets", "PAT data"):
        assert (
            paper_rows[item].status not in ("same", "") and "DIFFERS" not in paper_rows[item].status
        )


@pytest.mark.parametrize(
    ("name", "value", "item", "ours"),
    [
        ("esiii_steps", 7, "ESIII steps", "7"),
        ("esiii_step_size", 2 / 255, "ESIII step size", "signed gradient, 2/255 per step"),
        ("esiii_epsilon", 16 / 255, "ESIII epsilon", "L-inf bound 16/255"),
        ("batch_size", 3, "ESIII batch", "3 security instructions per step"),
        ("pat_steps", 9, "PAT steps", "9"),
        ("pat_control_len", 20, "PAT control length", "20"),
        ("pat_candidates", 64, "PAT candidates", "64 per step"),
        ("pat_topk", 32, "PAT top-k", "32"),
        (
            "pat_batch_size",
            25,
            "PAT batch",
            "25 malicious + 25 benign records per step, drawn "
            "anew each step from the training pool",
        ),
    ],
)
def test_a_changed_preset_parameter_changes_its_row(monkeypatch, shared_data, name, value, item,
                                                     ours):  # fmt: skip
    before = {row.item: row for row in recipe.recipe_rows("paper")}[item]
    monkeypatch.setitem(PRESETS["paper"]["02_vsp_training"], name, value)
    after = {row.item: row for row in recipe.recipe_rows("paper")}[item]
    assert after.ours == ours != before.ours
    assert after.status != "same"


def test_a_preset_that_trains_neither_says_so(monkeypatch, shared_data):
    monkeypatch.setitem(PRESETS["paper"]["02_vsp_training"], "variants", ["davsp"])
    rows = {row.item: row for row in recipe.recipe_rows("paper")}
    assert {rows[item].ours for item in ESIII_ROWS + PAT_ROWS} == {recipe.NOT_TRAINED}

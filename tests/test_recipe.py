"""The recipe card: reference values, how ours are read from a preset, and the reasons."""

from __future__ import annotations

import pytest

from davsp_lib import recipe
from davsp_lib.pipeline import PRESETS


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


def test_preset_reader_prefers_the_notebook_entry_then_common_then_the_default():
    read = recipe.PresetReader("paper")
    assert read("02_vsp_training", "dtype") == "bfloat16"
    assert read("02_vsp_training", "model") == PRESETS["paper"]["common"]["model"]
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

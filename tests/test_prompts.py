from __future__ import annotations

import pytest

from davsp_lib.data import prompts
from davsp_lib.runtime.errors import DataError


def test_named_prompts_and_lists(shared_data):
    assert prompts.text("davsp_safety_prefix", shared_data).startswith("Before processing")
    assert "I'm sorry" in prompts.items("refusal_prefixes_jailbreakbench", shared_data)
    with pytest.raises(DataError, match="no prompt text named 'nope'"):
        prompts.text("nope", shared_data)


@pytest.mark.parametrize(
    ("response", "mode", "expected"),
    [
        ("I'm sorry, but I can't help.", "substring", True),
        ("Sure! Step 1: ...", "substring", False),
        ("  Sorry, no.", "prefix", True),
        ("Here is why I'm sorry", "prefix", False),
    ],
)
def test_is_refusal(response, mode, expected):
    markers = ["I'm sorry"] if mode == "substring" else ["sorry", "i'm sorry"]
    assert prompts.is_refusal(response, markers, mode=mode) is expected


def test_refusal_marker_names_the_first_match():
    markers = ["cannot", "I'm sorry"]
    assert prompts.refusal_marker("I'm sorry, I cannot.", markers) == "cannot"
    assert prompts.refusal_marker("Sure.", markers) is None
    assert prompts.refusal_marker("  I'm Sorry", ["i'm sorry"], mode="prefix") == "i'm sorry"
    with pytest.raises(ValueError, match="mode must be"):
        prompts.refusal_marker("x", markers, mode="regex")

from __future__ import annotations

import pytest

from davsp_lib.models.conversation import Conversation


@pytest.mark.parametrize(
    ("placement", "expected"),
    [
        ("prefix", "SAFE\nWhat is this?"),
        ("suffix", "What is this?\nSAFE"),
        # AdaShield's code: qs = query + defense_query + query, nothing in between
        ("sandwich", "What is this?SAFEWhat is this?"),
    ],
)
def test_safety_prompt_placement(placement, expected):
    conv = Conversation("What is this?", safety_prompt="SAFE", safety_placement=placement)
    assert conv.user_text() == expected


def test_messages_carry_system_image_and_text():
    conv = Conversation("Q", system_prompt="SYS")
    assert conv.messages() == [
        {"role": "system", "content": [{"type": "text", "text": "SYS"}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]},
    ]
    assert Conversation("Q", has_image=False).messages()[0]["content"] == [
        {"type": "text", "text": "Q"}
    ]


def test_unknown_placement_is_refused():
    with pytest.raises(ValueError, match="unknown safety_placement"):
        Conversation("Q", safety_placement="middle")  # type: ignore[arg-type]


def test_prefix_separator_is_the_renderers_choice():
    conv = Conversation("Q?", safety_prompt="Be safe: ")
    assert conv.user_text("") == "Be safe: Q?"  # the DAVSP reference: prefix + query
    assert conv.messages("")[-1]["content"][-1] == {"type": "text", "text": "Be safe: Q?"}


def test_default_system_prompt_only_when_none_is_set():
    assert Conversation("Q").messages(default_system_prompt="D")[0]["content"][0]["text"] == "D"
    assert (
        Conversation("Q", system_prompt="S").messages(default_system_prompt="D")[0]["content"][0][
            "text"
        ]
        == "S"
    )
    assert (
        Conversation("Q", system_prompt="").messages(default_system_prompt="D")[0]["role"] == "user"
    )

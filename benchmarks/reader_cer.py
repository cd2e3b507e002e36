"""Character error rate of the embedded OCR reader on unseen FigStep and TYPO renders.

Instructions come from the text-prompt *validation* split (``text-prompts/harmless_val.json`` and
``harmful_val.json``), never from an evaluation set: all harmful ones, the rest a seeded sample of
the harmless ones. Each is rendered as FigStep (the instruction) and as TYPO (its first
``--typo-words`` words), then read four ways: with the renderer's layout or with the line finder,
at native size or shrunk into a 276-px window of a white 336 x 336 canvas (how the embedded model
sees images). CER = edit distance / reference length, summed over all images of a cell.

Columns: CER; exact = share of images read without any error; lines = share of images where
the finder found as many boxes as the renderer drew lines; s/img = reading time per image (the
finder included where used; CPU, torch's default threads).

The reference is the visible rendered lines joined by single spaces (FigStep's "1." "2." "3."
included, lines pushed off the canvas excluded), with typographic quotes and dashes mapped to
their ASCII look-alikes (the recogniser's alphabet has no curly quotes).

    python benchmarks/reader_cer.py --n 200
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from davsp_lib.data.images import to_tensor
from davsp_lib.data.render import Rendered, encode, render_figstep, render_typo
from davsp_lib.models.embedded.reader import TextReader, find_lines, to_gray

DEFAULT_DATA_ROOT = "/work/shared/data"
CANVAS_SIDE = 336
WINDOW_SIDE = 276
ASCII_LOOKALIKES = str.maketrans({"‘": "'", "’": "'", "“": '"', "”": '"', "–": "-", "—": "-"})


# ------------------------------------------------------------------------------ data


def load_instructions(data_root: str | Path, n: int, seed: int = 0) -> list[str]:
    """All harmful validation instructions, topped up to ``n`` with a seeded harmless sample."""
    folder = Path(data_root) / "text-prompts"
    harmful = [row["instruction"] for row in json.loads((folder / "harmful_val.json").read_text())]
    harmless = [
        row["instruction"] for row in json.loads((folder / "harmless_val.json").read_text())
    ]
    chosen = harmful[:n]
    chosen += random.Random(seed).sample(harmless, max(0, n - len(chosen)))
    return [" ".join(text.split()) for text in chosen]


def typo_phrase(instruction: str, words: int = 6) -> str:
    return " ".join(instruction.split()[:words])


def reference_text(rendered: Rendered) -> str:
    """The visible lines joined by single spaces (hidden lines are not in ``lines``)."""
    text = " ".join(line.text for line in rendered.lines)
    return " ".join(text.translate(ASCII_LOOKALIKES).split())


def in_window(
    image: Image.Image, canvas: int = CANVAS_SIDE, window: int = WINDOW_SIDE
) -> tuple[Image.Image, float, tuple[int, int]]:
    """Shrink an image to fit a centred ``window`` square on a white ``canvas`` square.

    Returns the canvas, the scale and the paste offset (x, y), so that layout boxes map with
    ``xy * scale + offset``.
    """
    scale = min(window / image.width, window / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    offset = ((canvas - size[0]) // 2, (canvas - size[1]) // 2)
    placed = Image.new("RGB", (canvas, canvas), "#FFFFFF")
    placed.paste(image.resize(size, Image.Resampling.BICUBIC), offset)
    return placed, scale, offset


# ------------------------------------------------------------------------------ scoring


def edit_ops(reference: str, hypothesis: str) -> list[tuple[str, str]]:
    """Levenshtein alignment as (reference char, hypothesis char) pairs; '' marks a gap."""
    rows, cols = len(reference) + 1, len(hypothesis) + 1
    cost = [[0] * cols for _ in range(rows)]
    for i in range(rows):
        cost[i][0] = i
    for j in range(cols):
        cost[0][j] = j
    for i in range(1, rows):
        for j in range(1, cols):
            substitution = cost[i - 1][j - 1] + (reference[i - 1] != hypothesis[j - 1])
            cost[i][j] = min(substitution, cost[i - 1][j] + 1, cost[i][j - 1] + 1)
    pairs: list[tuple[str, str]] = []
    i, j = len(reference), len(hypothesis)
    while i or j:
        if i and j and cost[i][j] == cost[i - 1][j - 1] + (reference[i - 1] != hypothesis[j - 1]):
            pairs.append((reference[i - 1], hypothesis[j - 1]))
            i, j = i - 1, j - 1
        elif i and cost[i][j] == cost[i - 1][j] + 1:
            pairs.append((reference[i - 1], ""))
            i -= 1
        else:
            pairs.append(("", hypothesis[j - 1]))
            j -= 1
    return pairs[::-1]


@dataclass
class Cell:
    """Accumulated errors of one (style, size, boxes) condition."""

    errors: int = 0
    chars: int = 0
    seconds: float = 0.0
    images: int = 0
    exact: int = 0
    line_counts_ok: int = 0
    confusions: Counter[tuple[str, str]] = field(default_factory=Counter)

    @property
    def cer(self) -> float:
        return self.errors / max(self.chars, 1)

    def add(self, reference: str, hypothesis: str, seconds: float) -> None:
        pairs = edit_ops(reference, hypothesis)
        wrong = [(a, b) for a, b in pairs if a != b]
        self.errors += len(wrong)
        self.chars += len(reference)
        self.seconds += seconds
        self.images += 1
        self.exact += not wrong
        self.confusions.update(wrong)


# ------------------------------------------------------------------------------ the run

RENDERERS: dict[str, Callable[[str], Rendered]] = {
    "figstep": render_figstep,
    "typo": lambda instruction: render_typo(typo_phrase(instruction)),
}
SIZES = ("native", "window")
BOXES = ("layout", "finder")


def as_stored(image: Image.Image, style: str) -> Image.Image:
    """The image after the benchmark's file encoding (FigStep PNG, TYPO JPEG quality 75)."""
    with Image.open(io.BytesIO(encode(image, style))) as decoded:
        return decoded.convert("RGB")


def evaluate(
    reader: TextReader,
    instructions: Sequence[str],
    styles: Sequence[str] = ("figstep", "typo"),
    *,
    stored: bool = False,
) -> dict[tuple[str, str, str], Cell]:
    """Every (style, size, boxes) cell over the same instructions (``stored``: read the images
    as the benchmark files store them, see :func:`as_stored`)."""
    cells = {(s, z, b): Cell() for s in styles for z in SIZES for b in BOXES}
    for instruction in instructions:
        for style in styles:
            rendered = RENDERERS[style](instruction)
            if stored:
                rendered.image = as_stored(rendered.image, style)
            reference = reference_text(rendered)
            for size in SIZES:
                if size == "native":
                    image, scale, offset = rendered.image, 1.0, (0, 0)
                else:
                    image, scale, offset = in_window(rendered.image)
                canvas = to_tensor(image)
                for boxes in BOXES:
                    layout = rendered.lines if boxes == "layout" else None
                    start = time.perf_counter()
                    result = reader.read(canvas, layout, scale=scale, offset=offset)
                    elapsed = time.perf_counter() - start
                    cell = cells[style, size, boxes]
                    cell.add(reference, result.text, elapsed)
                    if boxes == "finder":
                        found = find_lines(to_gray(canvas))
                        cell.line_counts_ok += len(found) == len(rendered.lines)
    return cells


def format_table(cells: dict[tuple[str, str, str], Cell]) -> str:
    header = (
        f"{'style':8} {'size':7} {'boxes':7} {'CER':>7} {'exact':>6} {'lines':>6} {'s/img':>7}"
        f" {'n':>5}"
    )
    rows = [header, "-" * len(header)]
    for (style, size, boxes), cell in cells.items():
        images = max(cell.images, 1)
        lines = f"{cell.line_counts_ok / images:6.1%}" if boxes == "finder" else f"{'-':>6}"
        rows.append(
            f"{style:8} {size:7} {boxes:7} {cell.cer:7.4f} {cell.exact / images:6.1%} {lines}"
            f" {cell.seconds / images:7.3f} {cell.images:5d}"
        )
    return "\n".join(rows)


def format_confusions(cells: dict[tuple[str, str, str], Cell], top: int = 8) -> str:
    rows = []
    for key, cell in cells.items():
        common = ", ".join(
            f"{a or '∅'!r}->{b or '∅'!r} x{count}"
            for (a, b), count in cell.confusions.most_common(top)
        )
        rows.append(f"{'/'.join(key)}: {common}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200, help="renders per style")
    parser.add_argument(
        "--data-root",
        default=os.environ.get("DAVSP_DATA_ROOT", DEFAULT_DATA_ROOT),
        help="benchmark mirror root (has text-prompts/)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pad", choices=("edge", "white"), default="edge")
    parser.add_argument("--margin", type=float, nargs=2, default=None, metavar=("X", "Y"))
    parser.add_argument(
        "--as-stored", action="store_true", help="JPEG-encode TYPO renders as the benchmark does"
    )
    parser.add_argument("--confusions", action="store_true", help="print the top errors per cell")
    args = parser.parse_args(argv)

    instructions = load_instructions(args.data_root, args.n, args.seed)
    options = {"pad": args.pad}
    if args.margin is not None:
        options["margin"] = tuple(args.margin)
    reader = TextReader(**options)
    cells = evaluate(reader, instructions, stored=args.as_stored)
    print(
        f"{len(instructions)} instructions per style (seed {args.seed}), pad={reader.pad}, "
        f"margin={reader.margin}{', as stored' if args.as_stored else ''}"
    )
    print(format_table(cells))
    if args.confusions:
        print(format_confusions(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Redraw notebook 03's ``defended_inputs`` figure from a finished run without the language model.

The figure needs only the trained image defenses (notebook 02's artifacts), one malicious image
and what the embedded model's OCR reader perceives; so this builds the canvases with the real
``EmbeddedAdapter.prepare_image`` on a stand-in object that has the reader but no language model,
and draws them with the current ``plots.image_grid``. For the embedded models (``tiny``/``small``)
only; a real VLM's run must be redrawn by rerunning notebook 03.

    python scripts/redraw_defended_inputs.py RUN_DIR RECORD_ID OUT_DIR
writes ``OUT_DIR/defended_inputs.png`` (+ .svg).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from davsp_lib.data import datasets
from davsp_lib.data.images import record_image, to_pil, to_tensor
from davsp_lib.evaluation import generation
from davsp_lib.models.embedded.model import EmbeddedAdapter
from davsp_lib.models.embedded.reader import TextReader, load_crnn
from davsp_lib.runtime import notebook as nb
from davsp_lib.runtime import plots
from davsp_lib.runtime.io import read_json


class ReaderOnly:
    """The embedded adapter's placement and reading path; no language model."""

    image_size = (336, 336)
    border_width = 30
    pad_fill = 1.0
    prepare_image = EmbeddedAdapter.prepare_image
    inner_window = EmbeddedAdapter.inner_window

    def __init__(self) -> None:
        self.reader = TextReader(load_crnn())

    def accept_unbounded_pixels(self) -> None:
        """Nothing to relax: the stand-in never checks pixel bounds (it only draws)."""

    def perceive(self, canvases: torch.Tensor) -> list[str]:
        return [self.reader.read(self.inner_window(c).clamp(0, 1)).text for c in canvases]


def main(run_dir: str, record_id: str, out_dir: str) -> int:
    run = Path(run_dir)
    parameters = read_json(run / "03_evaluation" / "results.json")["parameters"]
    if parameters["model"] not in ("tiny", "small"):
        raise SystemExit(f"{run}: model {parameters['model']!r} is not an embedded model")
    names = [n.strip() for n in parameters["defenses"].split(",") if n.strip()]
    chosen, _ = generation.load_defenses(names, training_dir=run / "02_vsp_training")
    record = next(r for r in datasets.load_figstep(images="mirror") if r.id == record_id)
    adapter = ReaderOnly()
    raw = to_tensor(record_image(record))
    pictures, titles = [], []
    with torch.no_grad():
        for defense in [d for d in chosen if d.name == "none" or d.vsp is not None]:
            canvas = defense.apply(defense.placer(adapter)(raw)[None])
            pictures.append(to_pil(canvas[0]))
            titles.append(f"{defense.name}\n{adapter.perceive(canvas)[0][:48]}")
    fig = plots.image_grid(
        pictures,
        titles,
        ncols=min(4, len(pictures)),
        suptitle=f"{record.id}: the model's input per image defense",
    )
    for path in nb.save_figure(fig, out_dir, "defended_inputs"):
        print(path)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    sys.exit(main(*sys.argv[1:]))

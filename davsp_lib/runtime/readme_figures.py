"""Copy the figures the README shows from a main-job run folder into ``figures/``.

A fresh clone has no run, so the README embeds a few small PNGs committed under ``figures/``
together with a manifest (``figures/manifest.json`` and ``figures/README.md``) that names the run,
its preset, model and commit (when known) and each notebook's headline from its
``results.json``. Re-encoding is deterministic: the same run gives byte-identical files.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from davsp_lib.models.adapters.registry import is_embedded
from davsp_lib.runtime.io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json

#: models that are the workbook's embedded stand-ins, not the paper's LLaVA-1.5 / Qwen2-VL
MAX_BYTES = 150_000


@dataclass(frozen=True)
class FigureSpec:
    notebook: str  # run sub-folder, e.g. "01_harmfulness_vector"
    name: str  # file stem under <run>/figures/<notebook>/
    what: str  # one line: what the figure shows

    @property
    def source(self) -> str:
        return f"figures/{self.notebook}/{self.name}.png"

    @property
    def target(self) -> str:
        return f"{self.notebook[:2]}_{self.name}.png"


README_FIGURES = (
    FigureSpec(
        "01_harmfulness_vector",
        "pca_layers",
        "PCA of last-token hidden states per layer: malicious vs benign, text vs image inputs",
    ),
    FigureSpec(
        "01_harmfulness_vector",
        "projections",
        "held-out projections on the harmfulness vector at the chosen layer, with the margins",
    ),
    FigureSpec(
        "02_vsp_training",
        "projections_before_after",
        "held-out projections before and after training the border",
    ),
    FigureSpec(
        "03_evaluation",
        "defended_inputs",
        "one malicious input as each image defense delivers it (the trained border around it)",
    ),
    FigureSpec(
        "03_evaluation",
        "rsr_utility",
        "resistance (RSR) per benchmark and benign-input utility per defense",
    ),
    FigureSpec(
        "04_intervention",
        "alpha_sweep",
        "activation intervention along the harmfulness vector: behaviour against alpha",
    ),
)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def palette(image: Image.Image) -> Image.Image:
    """256 colours, median cut, no dithering (deterministic; plots have few colours)."""
    return image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)


def encode_png(image: Image.Image, max_bytes: int = MAX_BYTES) -> bytes:
    """An RGB PNG (alpha flattened on white) under ``max_bytes``: as is if it fits, else as a
    256-colour palette, else shrunk by 0.8 per step (palette) until it fits."""
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        flat = Image.new("RGB", image.size, "white")
        flat.paste(image, mask=image.getchannel("A"))
        image = flat
    else:
        image = image.convert("RGB")
    data = _png(image)
    current = image
    while len(data) > max_bytes and min(current.size) > 64:
        data = _png(palette(current))
        if len(data) <= max_bytes:
            break
        size = (max(1, round(current.width * 0.8)), max(1, round(current.height * 0.8)))
        current = image.resize(size, Image.Resampling.LANCZOS)
    return data


def _results(run_dir: Path, notebook: str) -> dict[str, Any]:
    path = run_dir / notebook / "results.json"
    return read_json(path) if path.exists() else {}


def run_info(run_dir: Path, commit: str | None = None) -> dict[str, Any]:
    """What run.json records (preset, commit); ``commit`` fills in when run.json has none."""
    path = run_dir / "run.json"
    manifest = read_json(path) if path.exists() else {}
    return {
        "run": run_dir.name,
        "run_json": path.exists(),
        "preset": manifest.get("preset"),
        "commit": manifest.get("commit") or commit,
    }


def collect(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    specs: tuple[FigureSpec, ...] = README_FIGURES,
    commit: str | None = None,
    note: str | None = None,
    allow_missing: bool = False,
    max_bytes: int = MAX_BYTES,
) -> dict[str, Any]:
    """Copy ``specs`` from ``run_dir`` into ``out_dir``; write and return the manifest."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    missing = [run_dir / s.source for s in specs if not (run_dir / s.source).is_file()]
    if missing and not allow_missing:
        names = ", ".join(str(p) for p in missing)
        raise FileNotFoundError(f"figure(s) missing from the run: {names}")
    figures, skipped = [], [s.source for s in specs if not (run_dir / s.source).is_file()]
    for spec in specs:
        source = run_dir / spec.source
        if not source.is_file():
            continue
        try:
            with Image.open(source) as image:
                data = encode_png(image, max_bytes)
        except OSError as error:
            raise ValueError(f"{source}: not a readable PNG ({error})") from error
        atomic_write_bytes(out_dir / spec.target, data)
        results = _results(run_dir, spec.notebook)
        model = results.get("parameters", {}).get("model")
        with Image.open(io.BytesIO(data)) as written:
            size = list(written.size)
        figures.append(
            {
                "file": spec.target,
                "source": spec.source,
                "notebook": spec.notebook,
                "what": spec.what,
                "model": model,
                "embedded_stand_in": is_embedded(model),
                "headline": results.get("headline"),
                "written_at": results.get("written_at"),
                "pixels": size,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    manifest = {**run_info(run_dir, commit), "note": note, "figures": figures, "skipped": skipped}
    atomic_write_json(out_dir / "manifest.json", manifest)
    atomic_write_text(out_dir / "README.md", manifest_markdown(manifest))
    return manifest


def manifest_markdown(manifest: dict[str, Any]) -> str:
    """The human-readable twin of ``manifest.json``."""
    lines = [
        "# Figures shown in the README",
        "",
        "Written by `davsp figures --from RUN_DIR` (do not edit by hand; rerun it on a new run).",
        "",
        f"- run: `{manifest['run']}`; preset: `{manifest['preset']}`; "
        f"commit: `{manifest['commit']}`"
        + ("" if manifest["run_json"] else " (the run folder had no run.json)"),
    ]
    models = sorted({str(f["model"]) for f in manifest["figures"]})
    if any(f["embedded_stand_in"] for f in manifest["figures"]):
        lines.append(
            f"- model: `{', '.join(models)}` — the workbook's **embedded stand-in** (a small "
            "text model with an OCR front end, run on a CPU), **not** the paper's LLaVA-1.5 / "
            "Qwen2-VL: these figures show what the code does, not the paper's results."
        )
    else:
        lines.append(f"- model: `{', '.join(models)}`")
    if manifest.get("note"):
        lines.append(f"- note: {manifest['note']}")
    lines += ["", "| file | from the run | what it shows | notebook headline (results.json) |"]
    lines.append("|---|---|---|---|")
    for figure in manifest["figures"]:
        headline = (figure["headline"] or "—").replace("|", "\\|")
        lines.append(
            f"| [`{figure['file']}`]({figure['file']}) | `{figure['source']}` | "
            f"{figure['what']} | {headline} |"
        )
    if manifest["skipped"]:
        lines += [
            "",
            "Not in the run (skipped): " + ", ".join(f"`{s}`" for s in manifest["skipped"]),
        ]
    return "\n".join(lines) + "\n"

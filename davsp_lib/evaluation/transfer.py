"""Transfer: a Visual Safety Prompt trained on model A, used on model B.

A border lives in pixel space ``[0, 1]`` on A's canvas. Model B may take another canvas, so the
border is resampled to B's (bilinear, antialiased; the ring width scales with the canvas and is
rounded: :meth:`VisualSafetyPrompt.resampled`); each adapter applies its own normalisation
afterwards, so nothing else changes. On B the transferred border is evaluated with the same
text prefix as on A, beside B undefended and B with the prefix alone (what the border adds).

- :func:`transfer`: the border on B's canvas, its provenance in the metadata.
- :func:`geometry`: the canvas / width mapping and, for a model that reads its ring itself
  (the embedded default), whether the resampled ring covers exactly that ring.
- :func:`transfer_defenses`: B's rows (none, prefix only, transferred border + prefix).
- :func:`load_target`: model B by name; for an embedded name whose parts are not installed,
  the fallback model on another canvas, with a note saying so.
- :func:`evaluation_sets`: FigStep-style evaluation records as in notebook 03 (also used by
  notebook 06).
- :func:`tiny_code_path`: the LLaVA-1.5 -> Qwen2-VL path on the tiny random models (a border
  trained on LLaVA, resampled, then generation and projections on Qwen2-VL).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from davsp_lib.data.records import Record
from davsp_lib.evaluation.generation import Defense, exclude_used, make_defense, stratified_sample
from davsp_lib.method.vsp import VisualSafetyPrompt
from davsp_lib.models.adapters.base import VLMAdapter

#: the name of the transferred border's row (its artifact variant stays ``davsp``)
TRANSFER_NAME = "davsp_transfer"


def transfer(prompt: VisualSafetyPrompt, adapter: VLMAdapter) -> VisualSafetyPrompt:
    """``prompt`` resampled to ``adapter``'s canvas (a new object; ``prompt`` is unchanged).

    The metadata gains ``transfer``: the source model (from the prompt's own metadata), the
    target model, and both geometries.
    """
    moved = prompt.resampled(adapter.image_size)
    info = {
        "from_model": prompt.metadata.get("model"),
        "to_model": adapter.info(),
        "from": {"canvas": list(prompt.canvas), "width": prompt.width},
        "to": {"canvas": list(moved.canvas), "width": moved.width},
        "method": "bilinear, antialiased resize of the [0, 1] pixels; ring width scaled, rounded",
    }
    moved = VisualSafetyPrompt(
        moved.delta, moved.kind, moved.width, moved.epsilon, {**moved.metadata, "transfer": info},
        moved.clamp, moved.start,
    )  # fmt: skip
    moved.check_canvas(adapter)
    return moved


def geometry(
    prompt: VisualSafetyPrompt, moved: VisualSafetyPrompt, adapter: VLMAdapter
) -> dict[str, Any]:
    """How the border maps from A's canvas to B's (JSON-safe).

    ``model_ring``: the width of the ring B reads as its border (the embedded default's
    ``border_width``), else None; ``ring_matches``: whether the resampled border is exactly
    that ring (otherwise part of the border falls into B's reading window, or a white gap
    stays).
    """
    ring = adapter.border_width
    return {
        "source_canvas": list(prompt.canvas),
        "source_width": prompt.width,
        "target_canvas": list(moved.canvas),
        "target_width": moved.width,
        "scale": round(min(moved.canvas) / min(prompt.canvas), 6),
        "source_inner": list(prompt.inner_size),
        "target_inner": list(moved.inner_size),
        "model_ring": None if ring is None else int(ring),
        "ring_matches": None if ring is None else int(ring) == moved.width,
    }


def transferred_defense(
    moved: VisualSafetyPrompt, *, source: str | Path | None = None, root: str | Path | None = None
) -> Defense:
    """The transferred border with DAVSP's text prefix (as on model A)."""
    prefix = make_defense("davsp_prefix", root=root)
    origin = (moved.metadata.get("transfer") or {}).get("from_model")
    name = origin.get("model_id", "model A") if isinstance(origin, dict) else "model A"
    return Defense(
        name=TRANSFER_NAME,
        label=f"border from {name} (resampled) + prefix",
        safety_prompt=prefix.safety_prompt,
        placement=prefix.placement,
        prompt_name=prefix.prompt_name,
        vsp=moved,
        variant="davsp",
        source=None if source is None else str(source),
    )


def transfer_defenses(
    moved: VisualSafetyPrompt, *, source: str | Path | None = None, root: str | Path | None = None
) -> list[Defense]:
    """Model B's rows: undefended, the text prefix alone, the transferred border + prefix."""
    return [
        make_defense("none", root=root),
        make_defense("davsp_prefix", root=root),
        transferred_defense(moved, source=source, root=root),
    ]


def load_target(
    name: str,
    *,
    canvas: int = 0,
    border_width: int = 0,
    fallback: str = "tiny",
    fallback_canvas: int = 448,
    fallback_width: int = 40,
    dtype: str = "auto",
    device: str = "",
) -> tuple[VLMAdapter, dict[str, Any]]:
    """Model B and a note on what was loaded (through
    :func:`~davsp_lib.models.adapters.load_adapter`).

    Embedded names (``tiny``, ``small``, ``tiny-vit``) load with ``canvas`` / ``border_width``
    (0: the defaults, 336 / 30). When an embedded model's part packages are missing
    (:class:`~davsp_lib.models.embedded.weights.MissingPartError`), ``fallback`` is loaded on a
    ``fallback_canvas`` square canvas with a ``fallback_width`` ring instead, so the transfer
    still crosses a canvas change; the note says so. For other names ``canvas`` sets
    Qwen2-VL's input size.
    """
    from davsp_lib.models.adapters import is_embedded, load_adapter
    from davsp_lib.models.embedded.weights import MissingPartError

    options = {"dtype": dtype, "device_map": device or None}
    note: dict[str, Any] = {"requested": name, "fallback": False, "reason": None}
    if is_embedded(name):
        size = (canvas, canvas) if canvas else (336, 336)
        width = border_width or round(30 * min(size) / 336)
        try:
            adapter = load_adapter(name, image_size=size, border_width=width, **options)
        except MissingPartError as error:
            size, width = (fallback_canvas, fallback_canvas), fallback_width
            adapter = load_adapter(fallback, image_size=size, border_width=width, **options)
            note |= {"fallback": True, "reason": str(error)}
    else:
        adapter = load_adapter(name, image_size=(canvas, canvas) if canvas else None, **options)
    note["loaded"] = adapter.info()["model_id"]
    note["canvas"] = list(adapter.image_size)
    return adapter, note


# ------------------------------------------------------------------------------ data


def evaluation_sets(
    root: str | Path | None,
    *,
    n_figstep: int,
    n_harmful_val: int,
    n_harmless_val: int,
    n_mmvet: int = 0,
    mmvet_capability: str = "ocr",
    seed: int = 0,
    exclude: Iterable[str] = (),
) -> tuple[dict[str, list[Record]], list[str]]:
    """Named evaluation sets (malicious first) and notes, as notebook 03 chooses them.

    With a mirror: FigStep SafeBench images (stratified over categories), text-prompts
    ``harmful_val`` / ``harmless_val`` rendered FigStep-style, and MM-Vet questions needing
    ``mmvet_capability`` (benign, with reference answers). ``root=None``: the built-in set
    rendered FigStep-style. Records whose id, group or source record is in ``exclude`` (the
    training data of an artifact) are removed *before* sampling; empty sets are left out.
    """
    from davsp_lib.data import datasets

    used = set(exclude)
    notes: list[str] = []

    def sample(records: Iterable[Record], n: int, key=lambda r: r.category) -> list[Record]:
        kept, dropped = exclude_used(list(records), used)
        if dropped:
            notes.append(f"{len(dropped)} records left out (training data of an artifact)")
        return stratified_sample(kept, n, seed=seed, key=key) if n else []

    sets: dict[str, list[Record]] = {}
    if root is not None:
        sets["FigStep"] = sample(datasets.load_figstep(root, images="mirror"), n_figstep)
        for split, n in (("harmful_val", n_harmful_val), ("harmless_val", n_harmless_val)):
            chosen = sample(datasets.load_text_prompts(root, split), n)
            sets[f"{split} (FigStep-style)"] = list(datasets.as_image_attack(chosen))
        mmvet = [
            r
            for r in datasets.load_mmvet(root)
            if not mmvet_capability or mmvet_capability in r.meta["capability"]
        ]
        name = "MM-Vet" + (f" ({mmvet_capability})" if mmvet_capability else "")
        sets[name] = sample(mmvet, n_mmvet, key=lambda r: 0)
    else:
        notes.append("no benchmark mirror: the built-in set rendered FigStep-style")
        builtin = list(datasets.load_builtin("figstep"))
        sets["built-in harmful (FigStep-style)"] = sample(
            [r for r in builtin if r.is_malicious], n_figstep + n_harmful_val
        )
        sets["built-in benign (FigStep-style)"] = sample(
            [r for r in builtin if not r.is_malicious], n_harmless_val
        )
    return {name: records for name, records in sets.items() if records}, notes


# ------------------------------------------------------------------------------ tiny code path


def tiny_code_path(
    *, steps: int = 2, llava_size: int = 56, qwen_size: int = 84, width: int = 8, seed: int = 0
) -> dict[str, Any]:
    """LLaVA-1.5 -> Qwen2-VL on the tiny random models (meaningless outputs; the code path).

    Fits a vector on each model (4 + 4 built-in FigStep records, layer 2), trains a DAVSP
    border for ``steps`` steps on LLaVA (``llava_size`` canvas, ``width`` ring), resamples it to
    Qwen2-VL's ``qwen_size`` canvas, then generates on Qwen2-VL with the transferred defense
    and reads the projections there with and without it.
    """
    from davsp_lib.data import datasets
    from davsp_lib.evaluation.generation import defended_batches
    from davsp_lib.method import training, vectors
    from davsp_lib.models.adapters.tiny import build_tiny_llava, build_tiny_qwen2_vl

    layer = 2
    records = list(datasets.load_builtin("figstep"))
    malicious = [r for r in records if r.is_malicious][:4]
    benign = [r for r in records if not r.is_malicious][:4]
    source = build_tiny_llava(seed, image_size=llava_size)
    target = build_tiny_qwen2_vl(seed, image_size=qwen_size)

    def fit(adapter: VLMAdapter):
        acts = vectors.extract(adapter, malicious + benign, [layer], progress=False)
        vector = vectors.fit_vector(acts)
        scores = vector.project(acts, layer)
        return vector, (float(scores.max()) + 0.05, float(scores.min()))

    vector, (mu_plus, mu_minus) = fit(source)
    blank = VisualSafetyPrompt.blank(source.image_size, width)
    data = training.prepare_training_set(
        source, blank, malicious, benign, answer_tokens=4, progress=False
    )
    config = training.TrainConfig(
        layer=layer, mu_plus=mu_plus, mu_minus=mu_minus, steps=steps, batch_size=2, width=width,
        lr=0.05, seed=seed,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        trained = training.train(source, data, config, folder, vector=vector, progress=False)
    moved = transfer(trained.prompt, target)
    defense = transferred_defense(moved)
    texts: list[str] = []
    for _chunk, images, convs in defended_batches(target, malicious + benign, defense, 8):
        texts += target.generate(images, convs, max_new_tokens=4)
    target_vector, _ = fit(target)
    before = training.projections(target, malicious + benign, target_vector, layer)
    after = training.projections(
        target, malicious + benign, target_vector, layer, prompt=moved,
        safety_prompt=defense.safety_prompt,
    )  # fmt: skip
    return {
        "source": source.info(),
        "target": target.info(),
        "geometry": geometry(trained.prompt, moved, target),
        "trained": trained.prompt,
        "moved": moved,
        "losses": [h["loss"] for h in trained.history],
        "responses": texts,
        "projections": {"undefended": before, "transferred": after},
        "labels": np.array([r.is_malicious for r in malicious + benign]),
    }

"""ESIII baseline (Embedding Security Instructions Into Images; "Tit-for-Tat", arXiv 2503.11619).

The paper publishes no code; this is the recipe as its text describes it, with every value it
leaves open chosen here (see the README's source note):

1. **Defensive image.** From a blank image ``i_init``, projected gradient steps under an
   L-infinity bound make the frozen model, shown ``i_def`` with a *description instruction*
   ``t_d``, produce a corpus of security instructions ``s_1..s_n``:
   ``min_{i_def} sum_j -log p(s_j | t_d, i_def)``.
2. **Synthesis.** At inference the defensive image is fused with the user's image pixel by
   pixel and a textual security instruction goes with the query.

Here ``i_def = clamp(i_init + delta)`` with ``|delta| <= epsilon``; the fusion adds the same
``delta`` to the user image on the model's canvas (``clamp(x + delta, 0, 1)``), i.e. the trained
part is an additive :class:`~davsp_lib.method.vsp.VisualSafetyPrompt`, trained by
:func:`davsp_lib.method.training.train` (variant ``esiii``: signed gradient, checkpoints, resume) on
pseudo-records whose "answer" is one security instruction each. The texts (corpus, ``t_d``, the
textual instruction) are our own, CC0, in ``data/baselines/esiii.json``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from davsp_lib.data.records import Label, Record
from davsp_lib.method.training import TrainConfig, TrainingSet, TrainResult, train
from davsp_lib.method.vsp import VisualSafetyPrompt
from davsp_lib.models.adapters.base import VLMAdapter
from davsp_lib.models.conversation import Conversation
from davsp_lib.runtime.errors import DataError
from davsp_lib.runtime.io import read_json

TEXTS_FORMAT = "davsp-esiii-texts/1"
DEFAULT_TEXTS = Path(__file__).resolve().parents[3] / "data" / "baselines" / "esiii.json"
#: side of the blank image before it is put on the canvas (any size: it is uniform)
BLANK_SIDE = 64
#: the blank's grey level (our choice: mid-grey lets the bound move every pixel both ways)
BLANK_VALUE = 0.5
#: how the trained delta meets the user's image (also recorded in each artifact)
FUSION = "clamp(user canvas + delta, 0, 1)"


@dataclass(frozen=True)
class ESIIITexts:
    """The corpus of security instructions, ``t_d`` and the textual instruction."""

    security_instructions: tuple[str, ...]
    description_instruction: str
    text_instruction: str
    source: str

    def sha256(self) -> str:
        payload = json.dumps(
            [self.security_instructions, self.description_instruction, self.text_instruction]
        )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def load_texts(path: str | Path | None = None) -> ESIIITexts:
    """Read the ESIII texts; a malformed file raises :class:`DataError` naming it."""
    path = Path(path) if path is not None else DEFAULT_TEXTS
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != TEXTS_FORMAT:
        raise DataError(path, f"not an ESIII texts file (expected format {TEXTS_FORMAT!r})")
    corpus = data.get("security_instructions")
    if not isinstance(corpus, list) or not corpus:
        raise DataError(path, "'security_instructions' must be a non-empty list of strings")
    for index, item in enumerate(corpus):
        if not isinstance(item, str) or not item.strip():
            raise DataError(path, f"security_instructions[{index}] is not a non-empty string")
    for key in ("description_instruction", "text_instruction"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise DataError(path, f"{key!r} must be a non-empty string")
    return ESIIITexts(
        tuple(corpus),
        data["description_instruction"],
        data["text_instruction"],
        str(data.get("source", path)),
    )


def blank_canvas(adapter: VLMAdapter, value: float) -> torch.Tensor:
    """The blank image ``i_init`` (uniform ``value``) as the model receives an image."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"blank value must be in [0, 1], got {value}")
    return adapter.prepare_image(torch.full((3, BLANK_SIDE, BLANK_SIDE), float(value)))


def training_set(
    adapter: VLMAdapter, texts: ESIIITexts, *, blank: float = BLANK_VALUE
) -> TrainingSet:
    """One pseudo-record per security instruction: the blank canvas, ``t_d``, target ``s_j``.

    They are labelled malicious only because :func:`davsp_lib.method.training.train` trains the
    output loss of that side (as for UniGuard's corpus); no benchmark record is involved.
    """
    canvas = blank_canvas(adapter, blank)
    records = [
        Record(
            id=f"esiii/security-instruction-{index:02d}",
            query=texts.description_instruction,
            label=Label.MALICIOUS,
            source="esiii-corpus",
        )
        for index in range(len(texts.security_instructions))
    ]
    conversation = Conversation(texts.description_instruction)
    return TrainingSet(
        malicious=records,
        benign=[],
        canvases={r.id: canvas for r in records},
        conversations={r.id: conversation for r in records},
        answers={r.id: s for r, s in zip(records, texts.security_instructions, strict=True)},
        answer_source={r.id: "esiii security instruction" for r in records},
    )


def train_defensive_image(
    adapter: VLMAdapter,
    out_dir: str | Path,
    *,
    texts: ESIIITexts | None = None,
    steps: int = 200,
    batch_size: int = 4,
    step_size: float = 1 / 255,
    epsilon: float = 32 / 255,
    blank: float = BLANK_VALUE,
    checkpoint_every: int = 10,
    seed: int = 0,
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Optimise the defensive image (resumable in ``out_dir``); returns the trained prompt.

    PGD: ``delta -= step_size * sign(grad)``, then ``delta`` is clipped to ``[-epsilon,
    epsilon]`` (and the image to [0, 1] inside the model input). The returned prompt's
    metadata carries the texts so that :func:`defense_fields` rebuilds the same defense.
    """
    texts = texts or load_texts()
    data = training_set(adapter, texts, blank=blank)
    config = TrainConfig(
        layer=0, mu_plus=0.0, mu_minus=0.0, variant="esiii", steps=steps,
        batch_size=batch_size, optimizer="sign", lr=step_size, lam=0.0, schedule="alternate",
        epsilon=epsilon, checkpoint_every=checkpoint_every, seed=seed,
    )  # fmt: skip
    init = VisualSafetyPrompt.zero_noise(adapter.image_size, epsilon)
    return train(
        adapter, data, config, out_dir, init=init, progress=progress, stop_after=stop_after,
        metadata={
            **(metadata or {}),
            "method": "ESIII (reconstructed; no public code)",
            "esiii": {
                "blank": blank,
                "security_instructions": list(texts.security_instructions),
                "description_instruction": texts.description_instruction,
                "text_instruction": texts.text_instruction,
                "texts_sha256": texts.sha256(),
                "texts_source": texts.source,
                "fusion": FUSION,
            },
        },
    )  # fmt: skip


def text_instruction(prompt: VisualSafetyPrompt, source: str | Path) -> str:
    """The textual security instruction a trained ESIII artifact was made with."""
    text = prompt.metadata.get("esiii", {}).get("text_instruction")
    if not isinstance(text, str) or not text:
        raise DataError(source, "not an ESIII artifact (no esiii.text_instruction in metadata)")
    return text


def defense_fields(path: Path, *, adapter: VLMAdapter | None = None, root: Any = None) -> dict:
    """The ESIII defense's parts (:data:`davsp_lib.evaluation.generation.DEFENSES` builder): the
    trained delta fused with the user image + its text instruction."""
    vsp = VisualSafetyPrompt.load(path, adapter)
    return {
        "safety_prompt": text_instruction(vsp, path.with_suffix(".json")),
        "prompt_name": "esiii text_instruction (data/baselines/esiii.json)",
        "vsp": vsp,
    }


def instruction_likelihood(
    adapter: VLMAdapter,
    prompt: VisualSafetyPrompt,
    texts: ESIIITexts,
    *,
    blank: float = BLANK_VALUE,
) -> float:
    """Mean cross-entropy of the security instructions given ``t_d`` and ``i_def`` (lower:
    the defensive image carries them better); the quantity ESIII minimises."""
    from davsp_lib.method.training import answer_loss

    canvas = blank_canvas(adapter, blank)[None]
    image = prompt.apply(canvas.to(adapter.device))
    losses: list[float] = []
    with torch.no_grad():
        for instruction in texts.security_instructions:
            batch = adapter.encode(image, [Conversation(texts.description_instruction)],
                                   [instruction])  # fmt: skip
            assert batch.labels is not None
            keep = int((batch.labels != -100).sum()) + 1
            output = adapter.forward(batch, use_cache=False, logits_to_keep=keep)
            losses.append(float(answer_loss(output.logits, batch.labels)))
    return sum(losses) / len(losses)

"""UniGuard's image guardrail as published (Oh et al., 2024): noise making harmful text unlikely.

The recipe (from the paper, arXiv 2411.01703; its code is an anonymous link not reachable here):

- additive noise ``delta`` on the ``[0, 1]`` image at the model's input size, started uniformly
  at random in ``[-eps, eps]``, applied as ``clamp(x + delta, 0, 1)``;
- objective: *minimise* the likelihood of a harmful corpus given the noised image and the
  model's prompt with no user text, i.e. *ascend* the corpus cross-entropy;
- update: ``delta <- clamp(delta + alpha * sign(grad), -eps, eps)``, alpha = 1/255,
  eps = 16/255, 5000 iterations (the ``paper`` preset), a batch of corpus sentences per step;
- at test time its text part, a fixed suffix (``uniguard_text_suffix``), goes after the query.

This differs from DAVSP's loop (no hinge, no vector, gradient *ascent* on a likelihood, random
start), so it lives here; checkpoints use :mod:`davsp_lib.method.training`'s format and resume the
same way (bit-identical to an uninterrupted run: every draw is a pure function of the seed).

Substitution (stated with every result): UniGuard's corpus is a small set of toxic sentences
that no package here ships; :func:`harmful_corpus` makes one from harmful instructions as the
compliant openings a jailbroken model would write ("Sure, here is how to ..."), the standard
form of harmful targets (AdvBench's), without writing any harmful content.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from davsp_lib.data.records import Record
from davsp_lib.method.training import (
    CHECKPOINT_NAME,
    TrainingDiverged,
    answer_loss,
    resume_checkpoint,
    save_checkpoint,
    seeded_draws,
)
from davsp_lib.method.vsp import VisualSafetyPrompt
from davsp_lib.models.adapters.base import IGNORE_INDEX, VLMAdapter
from davsp_lib.models.conversation import Conversation
from davsp_lib.models.inputs import canvas_for

VARIANT = "uniguard_published"


@dataclass(frozen=True)
class UniGuardConfig:
    """UniGuard's published settings (``steps`` 5000 in the ``paper`` preset)."""

    steps: int = 5000
    epsilon: float = 16 / 255
    alpha: float = 1 / 255
    batch_size: int = 8
    checkpoint_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (0 < self.epsilon <= 1 and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(
                f"need 0 < epsilon <= 1 and alpha > 0, got {self.epsilon}, {self.alpha}"
            )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def harmful_corpus(records: Sequence[Record]) -> list[str]:
    """Compliant openings for harmful instructions: ``"Sure, here is how to <instruction>."``."""
    corpus = []
    for record in records:
        if not record.is_malicious:
            raise ValueError(f"harmful corpus: record {record.id} is not malicious")
        text = record.query.strip().rstrip(".?!")
        if not text:
            raise ValueError(f"harmful corpus: record {record.id} has an empty query")
        corpus.append(f"Sure, here is how to {text[0].lower()}{text[1:]}.")
    return corpus


def initial_noise(canvas: tuple[int, int], epsilon: float, seed: int) -> torch.Tensor:
    """UniGuard's random start: uniform in ``[-eps, eps]``, ``[3, H, W]``."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(3, *canvas, generator=generator) * 2 - 1) * epsilon


def corpus_loss(adapter: VLMAdapter, images: torch.Tensor, targets: Sequence[str]) -> torch.Tensor:
    """Mean next-token cross-entropy of ``targets`` after the image and an empty user turn."""
    conversations = [Conversation("", has_image=True)] * len(targets)
    batch = adapter.encode(images, conversations, list(targets))
    assert batch.labels is not None
    keep = int((batch.labels != IGNORE_INDEX).sum(1).max()) + 1
    output = adapter.forward(batch, use_cache=False, logits_to_keep=keep)
    return answer_loss(output.logits, batch.labels)


@dataclass
class UniGuardResult:
    prompt: VisualSafetyPrompt
    history: list[dict[str, Any]]
    resumed_from: int
    seconds: float


def _fingerprint(
    config: UniGuardConfig, adapter: VLMAdapter, records: Sequence[Record], corpus: Sequence[str]
) -> str:
    payload = [config.to_json(), adapter.info()["model_id"], [r.id for r in records], list(corpus)]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def train_uniguard(
    adapter: VLMAdapter,
    images: Sequence[Record],
    corpus: Sequence[str],
    config: UniGuardConfig,
    out_dir: str | Path,
    *,
    progress: bool = True,
    stop_after: int | None = None,
) -> UniGuardResult:
    """Train (or resume) UniGuard's image guardrail on the images of ``images`` (each step draws
    ``batch_size`` images and corpus sentences); ``out_dir`` holds the checkpoint."""
    if not images or not corpus:
        raise ValueError("UniGuard training needs at least one image record and one sentence")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    canvases = torch.stack([canvas_for(adapter, r) for r in images])
    fingerprint = _fingerprint(config, adapter, images, corpus)
    count = config.steps * config.batch_size
    image_draws = seeded_draws(len(images), count, config.seed, 1)
    text_draws = seeded_draws(len(corpus), count, config.seed, 2)

    delta = initial_noise(adapter.image_size, config.epsilon, config.seed).to(adapter.device)
    history: list[dict[str, Any]] = []
    start = 0
    checkpoint = out_dir / CHECKPOINT_NAME
    resumed = resume_checkpoint(
        checkpoint, fingerprint, run="UniGuard ", changed="config, model, images or corpus"
    )
    if resumed is not None:
        tensors, state = resumed
        delta = tensors["delta"].to(adapter.device)
        history, start = state["history"], int(state["step"])
    delta.requires_grad_(True)

    def save(step: int) -> None:
        state = {"fingerprint": fingerprint, "step": step, "history": history,
                 "config": config.to_json(), "variant": VARIANT}  # fmt: skip
        save_checkpoint(checkpoint, delta, None, state, {})

    last = min(config.steps, stop_after if stop_after is not None else config.steps)
    began = time.perf_counter()
    for step in tqdm(range(start, last), initial=start, total=config.steps, disable=not progress):
        rows = slice(step * config.batch_size, (step + 1) * config.batch_size)
        batch = canvases[image_draws[rows]].to(adapter.device)
        targets = [corpus[i] for i in text_draws[rows]]
        loss = corpus_loss(adapter, (batch + delta).clamp(0, 1), targets)
        loss.backward()
        grad = delta.grad
        if not torch.isfinite(loss) or grad is None or not torch.isfinite(grad).all():
            save(step)
            raise TrainingDiverged(f"UniGuard step {step}: non-finite loss or gradient")
        with torch.no_grad():  # ascend: make the harmful corpus less likely
            delta.add_(config.alpha * grad.sign()).clamp_(-config.epsilon, config.epsilon)
        delta.grad = None
        history.append({"step": step + 1, "corpus_nll": float(loss.detach())})
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == last:
            save(step + 1)
    metadata = {
        "model": adapter.info(),
        "variant": VARIANT,
        "config": config.to_json(),
        "objective": "ascend the harmful-corpus cross-entropy (UniGuard, as published)",
        "corpus_size": len(corpus),
        "corpus_sha256": hashlib.sha256("\n".join(corpus).encode()).hexdigest(),
        "steps_done": len(history),
        "losses": [h["corpus_nll"] for h in history],
    }
    prompt = VisualSafetyPrompt(delta.detach().cpu(), "additive", 0, config.epsilon, metadata)
    return UniGuardResult(prompt, history, start, time.perf_counter() - began)

"""Training a Visual Safety Prompt with Deep Alignment (and the ablations / UniGuard baseline).

The model is frozen; only ``delta`` (the border, or an additive pattern) trains. Per step:

- **projection loss** (DA): ``mean_b [mal_b] relu(mu_plus - s_b) + [ben_b] relu(s_b - mu_minus)``
  with ``s = v_l . h_l`` of the last input token, computed in float32;
- **output loss**: next-token cross-entropy of benign reference answers (``lam``), and, for the
  output-only variants, of a refusal on malicious inputs.

One forward serves both losses. A step that needs only the projection stops the forward after
layer ``l``; a step with an output loss runs to the end, reads ``h_l`` with a hook on the way, and
computes logits only for the answer positions (``logits_to_keep``).

Long runs: a checkpoint (one safetensors file: delta, optimiser state, history as JSON metadata)
is written atomically every ``checkpoint_every`` steps; :func:`train` on the same folder with the
same config and data resumes from it and ends bit-identical to an uninterrupted run, because the
whole batch plan is a pure function of the seed. A non-finite loss or gradient stops the run with
:class:`TrainingDiverged`, after saving the last good state.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from davsp_lib.data.records import Record
from davsp_lib.method.vectors import HarmfulnessVector
from davsp_lib.method.vsp import VisualSafetyPrompt, placer_for
from davsp_lib.models.adapters.base import IGNORE_INDEX, EncodedBatch, VLMAdapter
from davsp_lib.models.adapters.hooks import capture_hidden, run_until_stop
from davsp_lib.models.conversation import Conversation
from davsp_lib.models.inputs import canvas_for, conversation_for
from davsp_lib.runtime.errors import DataError
from davsp_lib.runtime.io import atomic_write_bytes, atomic_write_json, read_json

if TYPE_CHECKING:
    from davsp_lib.data.pools import Pools

Variant = Literal["davsp", "da_noise", "vsp_output", "uniguard", "esiii"]
#: variant -> (prompt kind, projection loss?, benign output loss?, malicious refusal loss?)
VARIANTS: dict[str, tuple[str, bool, bool, bool]] = {
    "davsp": ("border", True, True, False),  # the method: border + DA + benign output loss
    "da_noise": ("additive", True, True, False),  # ablation: DA with additive noise, no padding
    "vsp_output": ("border", False, True, True),  # ablation: border, output loss only
    "uniguard": ("additive", False, False, True),  # baseline: eps-bounded noise -> refusal
    # baseline (davsp_lib.evaluation.defenses.esiii): eps-bounded image -> a corpus of security
    # instructions
    "esiii": ("additive", False, False, True),
}
#: the refusal the output-only variants are trained to produce on malicious inputs
REFUSAL_TARGET = "I'm sorry, but I can't help with that request."
CHECKPOINT_NAME = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "davsp-training-checkpoint/1"


class TrainingDiverged(RuntimeError):
    """A loss or gradient became NaN/Inf; the last good state is in the checkpoint."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a run (its hash guards resume against a changed config)."""

    layer: int
    mu_plus: float
    mu_minus: float
    variant: Variant = "davsp"
    steps: int = 100
    batch_size: int = 4
    #: "adam" (default here) or "sign" (the reference: delta -= lr * sign(grad))
    optimizer: Literal["adam", "sign"] = "adam"
    #: Adam learning rate, or the signed step in [0, 1] pixel units (reference: 1/255)
    lr: float = 0.01
    lam: float = 0.02  # weight of the output loss (reference: 0.02)
    #: DA variants: probability that a malicious batch also gets the output loss (weight lam)
    #: on refusal targets (reference: 0.05); drawn in the batch plan, so resume stays exact
    malicious_output_p: float = 0.0
    #: train the end-of-sequence token after each target answer (the reference does not)
    answer_eos: bool = True
    #: "alternate" malicious/benign batches (a malicious step stops at layer l), "mix" (half
    #: and half in every batch) or "random" (the reference: malicious with p = 0.5)
    schedule: Literal["alternate", "mix", "random"] = "alternate"
    width: int = 30  # border width p (border kinds)
    epsilon: float = 16 / 255  # bound of additive kinds (UniGuard: 16/255)
    checkpoint_every: int = 10
    snapshot_every: int = 0  # keep the border every N steps for figures (0: start and end only)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {self.variant!r}")
        if self.optimizer not in ("adam", "sign"):
            raise ValueError(f"optimizer must be 'adam' or 'sign', got {self.optimizer!r}")
        if self.schedule not in ("alternate", "mix", "random"):
            raise ValueError(f"schedule must be alternate, mix or random, got {self.schedule!r}")
        for name in ("steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.schedule == "mix" and self.batch_size < 2:
            raise ValueError("schedule 'mix' needs batch_size >= 2 (half malicious, half benign)")
        if not 0.0 <= self.malicious_output_p <= 1.0:
            raise ValueError(f"malicious_output_p must be in [0, 1], got {self.malicious_output_p}")
        for name in ("lr", "lam", "mu_plus", "mu_minus", "epsilon"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")
        if self.lr <= 0 or self.lam < 0:
            raise ValueError(f"need lr > 0 and lam >= 0, got lr={self.lr}, lam={self.lam}")
        if self.uses_projection and self.mu_plus <= self.mu_minus:
            raise ValueError(f"mu_plus {self.mu_plus} must exceed mu_minus {self.mu_minus}")

    @property
    def kind(self) -> str:
        return VARIANTS[self.variant][0]

    @property
    def uses_projection(self) -> bool:
        return VARIANTS[self.variant][1]

    @property
    def benign_output(self) -> bool:
        return VARIANTS[self.variant][2] and self.lam > 0

    @property
    def malicious_output(self) -> bool:
        return VARIANTS[self.variant][3]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------ the batch plan


@dataclass(frozen=True)
class Step:
    malicious: tuple[int, ...]  # indices into the malicious records
    benign: tuple[int, ...]
    #: the malicious rows also get the output loss (refusal targets, weight lam) this step
    malicious_output: bool = False


def seeded_draws(n: int, count: int, seed: int, stream: int) -> list[int]:
    """``count`` indices from consecutive seeded permutations of ``range(n)`` (epochs)."""
    out: list[int] = []
    epoch = 0
    while len(out) < count:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + stream * 7919 + epoch)
        out += torch.randperm(n, generator=generator).tolist()
        epoch += 1
    return out[:count]


def batch_plan(config: TrainConfig, n_malicious: int, n_benign: int) -> list[Step]:
    """Which records every step uses: a pure function of the config and the data sizes."""
    if n_malicious < 1 and config.variant != "vsp_output":
        raise ValueError("training needs malicious records")
    if n_benign < 1 and (config.uses_projection or config.benign_output):
        raise ValueError("training needs benign records")
    size = config.batch_size
    if config.schedule == "mix":
        half = size // 2
        kinds = [(size - half, half)] * config.steps
    elif config.schedule == "alternate":
        kinds = [(size, 0) if s % 2 == 0 else (0, size) for s in range(config.steps)]
    else:
        generator = torch.Generator().manual_seed(config.seed)
        coins = torch.rand(config.steps, generator=generator).tolist()
        kinds = [(size, 0) if c < 0.5 else (0, size) for c in coins]
    if config.variant in ("uniguard", "esiii"):  # one target corpus, no benign side
        kinds = [(size, 0)] * config.steps
    mal = seeded_draws(n_malicious, sum(k[0] for k in kinds), config.seed, 1) if n_malicious else []
    ben = seeded_draws(n_benign, sum(k[1] for k in kinds), config.seed, 2) if n_benign else []
    coins = malicious_output_coins(config)
    plan, i, j = [], 0, 0
    for (n_mal, n_ben), coin in zip(kinds, coins, strict=True):
        extra = n_mal > 0 and not config.malicious_output and coin < config.malicious_output_p
        plan.append(Step(tuple(mal[i : i + n_mal]), tuple(ben[j : j + n_ben]), extra))
        i, j = i + n_mal, j + n_ben
    return plan


def malicious_output_coins(config: TrainConfig) -> list[float]:
    """One uniform draw per step (its own seeded stream: the batch draws do not move)."""
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + 3 * 7919)
    return torch.rand(config.steps, generator=generator, dtype=torch.float64).tolist()


# ------------------------------------------------------------------------------ data


@dataclass
class TrainingSet:
    """Placed canvases, conversations and (benign) answers, prepared once before training."""

    malicious: list[Record]
    benign: list[Record]
    canvases: dict[str, torch.Tensor]  # record id -> placed canvas [3, H, W]
    conversations: dict[str, Conversation]
    answers: dict[str, str]  # benign id -> target answer; malicious -> refusal (output variants)
    answer_source: dict[str, str] = field(default_factory=dict)  # id -> "reference" | "model"

    def fingerprint(self) -> str:
        """Hash of ids, prompts and answers: a resume must see the same data."""
        digest = hashlib.sha256()
        for record in [*self.malicious, *self.benign]:
            conv = self.conversations[record.id]
            digest.update(json.dumps([record.id, conv.user_text(), self.answers.get(record.id)])
                          .encode())  # fmt: skip
        return digest.hexdigest()


def prepare_training_set(
    adapter: VLMAdapter,
    prompt: VisualSafetyPrompt,
    malicious: Sequence[Record],
    benign: Sequence[Record],
    *,
    safety_prompt: str | None = None,
    answers_path: str | Path | None = None,
    answer_tokens: int = 32,
    batch_size: int = 4,
    progress: bool = True,
) -> TrainingSet:
    """Place every image once; benign answers = the record's reference, else the model's own.

    The model's own answers are those of the *undefended* model (the image as
    ``adapter.prepare_image`` gives it, no safety prompt, greedy, ``answer_tokens`` long): the
    output loss asks the defended model to answer benign inputs as it did without defense. They
    are cached in ``answers_path`` (JSON, atomic) so a resumed run reuses them exactly.
    """
    malicious, benign = list(malicious), list(benign)
    ids = [r.id for r in [*malicious, *benign]]
    if len(set(ids)) != len(ids):
        raise ValueError("a record id appears twice in the training data")
    canvases, conversations = {}, {}
    for record in [*malicious, *benign]:
        canvases[record.id] = canvas_for(adapter, record, placer_for(prompt, adapter))
        conversations[record.id] = conversation_for(
            record, has_image=True, safety_prompt=safety_prompt
        )
    answers: dict[str, str] = {}
    source: dict[str, str] = {}
    cached: dict[str, str] = {}
    if answers_path is not None and Path(answers_path).is_file():
        stored = read_json(answers_path)
        if not isinstance(stored, dict) or not isinstance(stored.get("answers"), dict):
            raise DataError(answers_path, "expected {'answers': {id: text}}")
        cached = stored["answers"]
    missing = [r for r in benign if not r.reference and r.id not in cached]
    for start in tqdm(range(0, len(missing), batch_size), desc="own answers", disable=not progress):
        chunk = missing[start : start + batch_size]
        # undefended: the image as the model normally gets it, no safety prompt
        images = torch.stack([canvas_for(adapter, r) for r in chunk])
        plain = [conversation_for(r, has_image=True) for r in chunk]
        texts = adapter.generate(images, plain, max_new_tokens=answer_tokens)
        cached.update({r.id: t for r, t in zip(chunk, texts, strict=True)})
        if answers_path is not None:  # keep finished answers if the run is stopped here
            atomic_write_json(answers_path, {"answers": cached, "tokens": answer_tokens})
    for record in benign:
        if record.reference:
            answers[record.id], source[record.id] = target_text(record.reference), "reference"
        else:
            answers[record.id], source[record.id] = cached[record.id], "model"
    for record in malicious:
        answers[record.id], source[record.id] = REFUSAL_TARGET, "refusal target"
    return TrainingSet(malicious, benign, canvases, conversations, answers, source)


def target_text(reference: str) -> str:
    """A reference answer as a training target: MM-Vet's scoring markers are not answer text.

    ``a<OR>b`` (alternatives the scorer accepts) keeps the first alternative; ``a<AND>b``
    (every part required) becomes ``a, b``. Text without markers is returned unchanged.
    """
    first = reference.split("<OR>")[0]
    parts = [part.strip() for part in first.split("<AND>")]
    return ", ".join(part for part in parts if part) if "<AND>" in first else first


# ------------------------------------------------------------------------------ one step


@dataclass
class StepOutput:
    loss: torch.Tensor
    projection_loss: float
    output_loss: float
    projections: dict[str, list[float]]  # "malicious"/"benign" -> s per sample


def hinge(scores: torch.Tensor, malicious: torch.Tensor, mu_plus: float, mu_minus: float):
    """Per-sample DA hinge: ``relu(mu_plus - s)`` (malicious), ``relu(s - mu_minus)`` (benign)."""
    return torch.where(malicious, F.relu(mu_plus - scores), F.relu(scores - mu_minus))


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over answer tokens; ``logits`` cover the last positions."""
    keep = logits.shape[1]
    targets = labels[:, -(keep - 1) :] if keep > 1 else labels[:, :0]
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


def drop_final_label(labels: torch.Tensor) -> torch.Tensor:
    """``labels`` with each row's last supervised token (the appended EOS) ignored."""
    supervised = labels != IGNORE_INDEX
    positions = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
    last = torch.where(supervised, positions, -1).amax(dim=1, keepdim=True)
    return labels.masked_fill((positions == last) & supervised, IGNORE_INDEX)


def forward_losses(
    adapter: VLMAdapter,
    images: torch.Tensor,
    conversations: Sequence[Conversation],
    is_malicious: Sequence[bool],
    answers: Sequence[str | None],
    config: TrainConfig,
    direction: torch.Tensor | None,
    *,
    malicious_output: bool = False,
) -> StepOutput:
    """Both losses from one forward (truncated at the layer when no output loss is needed).

    ``malicious_output``: this step's malicious rows also get the output loss (weight ``lam``,
    the batch plan's draw with ``config.malicious_output_p``). Every loss term is computed in
    float32 on ``adapter.device`` (the device of the inputs): with ``device_map="auto"`` the
    hidden state of layer ``l`` and the logits live on other GPUs and are moved there first.
    """
    loss_device = adapter.device
    malicious = torch.tensor(list(is_malicious), device=loss_device)
    malicious_output = config.malicious_output or (malicious_output and config.lam > 0)
    wants_output = [
        (malicious_output if mal else config.benign_output) and answer is not None
        for mal, answer in zip(is_malicious, answers, strict=True)
    ]
    need_logits = any(wants_output)
    targets = [a if w else "" for a, w in zip(answers, wants_output, strict=True)]
    batch: EncodedBatch = adapter.encode(images, conversations, targets if need_logits else None)
    loss = torch.zeros((), device=loss_device)
    projection_loss = output_loss = 0.0
    projections: dict[str, list[float]] = {"malicious": [], "benign": []}
    layers = [config.layer] if config.uses_projection else []
    with capture_hidden(
        adapter.language_layers,
        layers or [0],
        batch.last_input_index,
        stop_after_deepest=not need_logits,
    ) as store:
        if need_logits:
            assert batch.labels is not None
            answer_length = int((batch.labels != IGNORE_INDEX).sum(1).max())
            output = adapter.forward(batch, use_cache=False, logits_to_keep=answer_length + 1)
        else:
            run_until_stop(adapter.model, **batch.model_inputs, use_cache=False)
    if config.uses_projection:
        assert direction is not None
        scores = store[config.layer].to(loss_device).float() @ direction.to(loss_device)
        per_sample = hinge(scores, malicious, config.mu_plus, config.mu_minus)
        loss = loss + per_sample.mean()
        projection_loss = float(per_sample.mean().detach())
        for score, mal in zip(scores.tolist(), is_malicious, strict=True):
            projections["malicious" if mal else "benign"].append(score)
    if need_logits:
        assert batch.labels is not None
        all_labels = batch.labels.to(loss_device)
        if not config.answer_eos:  # the reference's targets end without the EOS token
            all_labels = drop_final_label(all_labels)
        logits = output.logits.to(loss_device)
        wanted = torch.tensor(wants_output, device=loss_device)
        # refusal CE on malicious rows (weight 1 for the output-only variants, lam for the DA
        # variants' drawn steps), lam * reference-answer CE on benign rows
        malicious_weight = 1.0 if config.malicious_output else config.lam
        for rows, weight in ((malicious, malicious_weight), (~malicious, config.lam)):
            labels = all_labels.masked_fill(~(rows & wanted)[:, None], IGNORE_INDEX)
            if (labels != IGNORE_INDEX).any():
                ce = answer_loss(logits, labels)
                loss = loss + weight * ce
                output_loss += weight * float(ce.detach())
    return StepOutput(loss, projection_loss, output_loss, projections)


# ------------------------------------------------------------------------------ checkpoints


def save_checkpoint(
    path: Path,
    delta: torch.Tensor,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    snapshots: dict[int, torch.Tensor],
) -> None:
    """Write a trainer's checkpoint atomically (also used by ``uniguard`` and ``pat``)."""
    from safetensors.torch import save as to_bytes

    tensors = {"delta": delta.detach().cpu().contiguous()}
    if optimizer is not None:
        for key, value in optimizer.state.get(delta, {}).items():
            tensors[f"optimizer.{key}"] = value.detach().cpu().reshape(value.shape).contiguous()
    for step, snap in snapshots.items():
        tensors[f"snapshot.{step}"] = snap.contiguous()
    # one metadata key: safetensors writes several keys in no fixed order (bytes would differ)
    metadata = {"davsp": json.dumps({"format": CHECKPOINT_FORMAT, "state": state})}
    atomic_write_bytes(path, to_bytes(tensors, metadata=metadata))


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # a torn or foreign file
        raise DataError(path, f"not a readable training checkpoint ({exc})") from None
    try:
        header = json.loads(metadata.get("davsp", "{}"))
    except json.JSONDecodeError:
        header = {}
    if header.get("format") != CHECKPOINT_FORMAT or "delta" not in tensors:
        raise DataError(path, f"not a training checkpoint (format {header.get('format')!r})")
    return tensors, header["state"]


def resume_checkpoint(
    path: Path, fingerprint: Any, *, run: str, changed: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """A trainer's checkpoint to resume from (None: there is none yet).

    One written for another ``fingerprint`` raises :class:`DataError`: ``"checkpoint belongs
    to a different {run}run ({changed} changed)"``, so a rerun never mixes two trainings.
    """
    if not path.is_file():
        return None
    tensors, state = load_checkpoint(path)
    if state.get("fingerprint") != fingerprint:
        raise DataError(
            path,
            f"checkpoint belongs to a different {run}run ({changed} changed); delete it or "
            "train into another folder",
        )
    return tensors, state


# ------------------------------------------------------------------------------ the loop


@dataclass
class TrainResult:
    prompt: VisualSafetyPrompt
    history: list[dict[str, Any]]
    snapshots: dict[int, torch.Tensor]
    resumed_from: int  # step the run resumed at (0: fresh)
    seconds: float


def _run_fingerprint(
    config: TrainConfig, data: TrainingSet, adapter: VLMAdapter, prompt: VisualSafetyPrompt
) -> str:
    payload = json.dumps(
        [config.to_json(), data.fingerprint(), adapter.info()["model_id"], prompt.canvas,
         prompt.clamp,
         hashlib.sha256(prompt.delta.cpu().numpy().tobytes()).hexdigest()],
        default=str,
    )  # fmt: skip
    return hashlib.sha256(payload.encode()).hexdigest()


def train(
    adapter: VLMAdapter,
    data: TrainingSet,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    vector: HarmfulnessVector | None = None,
    init: VisualSafetyPrompt | None = None,
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train (or resume training) a safety prompt; returns it with its history.

    ``out_dir`` holds ``checkpoint.safetensors``; when it exists and belongs to the same run
    (config, data, model, initial prompt), training continues from it. ``stop_after`` ends the
    call after that many steps in total (for tests and interactive use; resuming continues).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompt = init or VisualSafetyPrompt.for_adapter(
        adapter, config.kind, width=config.width, epsilon=config.epsilon
    )
    if prompt.kind != config.kind:
        raise ValueError(
            f"variant {config.variant!r} trains a {config.kind} prompt, not {prompt.kind}"
        )
    prompt.check_canvas(adapter)
    direction = None
    if config.uses_projection:
        if vector is None:
            raise ValueError(f"variant {config.variant!r} needs the harmfulness vector")
        vector.check_compatible(adapter)
        direction = vector.direction(config.layer, dtype=torch.float32, device=adapter.device)
    plan = batch_plan(config, len(data.malicious), len(data.benign))
    fingerprint = _run_fingerprint(config, data, adapter, prompt)

    delta = prompt.delta.clone().to(adapter.device).requires_grad_(True)
    optimizer = torch.optim.Adam([delta], lr=config.lr) if config.optimizer == "adam" else None
    history: list[dict[str, Any]] = []
    snapshots: dict[int, torch.Tensor] = {0: prompt.delta.clone()}
    start_step = 0
    checkpoint = out_dir / CHECKPOINT_NAME
    resumed = resume_checkpoint(
        checkpoint, fingerprint, run="", changed="config, data, model or initial prompt"
    )
    if resumed is not None:
        tensors, state = resumed
        with torch.no_grad():
            delta.copy_(tensors["delta"])
        if optimizer is not None and state.get("optimizer_steps"):
            optimizer.state[delta] = {  # Adam keeps its step counter on the CPU
                key.removeprefix("optimizer."): value if key == "optimizer.step"
                else value.to(adapter.device)
                for key, value in tensors.items()
                if key.startswith("optimizer.")
            }  # fmt: skip
        snapshots = {
            int(key.removeprefix("snapshot.")): value
            for key, value in tensors.items()
            if key.startswith("snapshot.")
        }
        history, start_step = state["history"], int(state["step"])

    def save(step: int) -> None:
        state = {
            "fingerprint": fingerprint,
            "step": step,
            "history": history,
            "optimizer_steps": bool(optimizer is not None and optimizer.state),
            "config": config.to_json(),
        }
        save_checkpoint(checkpoint, delta, optimizer, state, snapshots)

    mask = prompt.mask(adapter.device)
    last = min(config.steps, stop_after if stop_after is not None else config.steps)
    began = time.perf_counter()
    with contextlib.ExitStack() as stack:
        # one border for the whole batch: models that read it per row may read it once
        stack.enter_context(adapter.shared_border())
        bar = stack.enter_context(
            tqdm(total=config.steps, initial=start_step, desc=config.variant, disable=not progress)
        )
        for step in range(start_step, last):
            tick = time.perf_counter()
            entry = plan[step]
            records = [data.malicious[i] for i in entry.malicious] + [
                data.benign[i] for i in entry.benign
            ]
            canvases = torch.stack([data.canvases[r.id] for r in records]).to(adapter.device)
            images = prompt.apply(canvases, delta)
            out = forward_losses(
                adapter,
                images,
                [data.conversations[r.id] for r in records],
                [r.is_malicious for r in records],
                [data.answers.get(r.id) for r in records],
                config,
                direction,
                malicious_output=entry.malicious_output,
            )
            if not out.loss.requires_grad:  # nothing to learn from this batch (e.g. lam = 0)
                history.append({"step": step + 1, "loss": float(out.loss), "skipped": True})
                bar.update(1)
                continue
            if not torch.isfinite(out.loss):
                save(step)
                raise TrainingDiverged(
                    f"step {step}: loss is {float(out.loss.detach())}; the last good state "
                    f"(step {step}) is in {checkpoint}. Lower lr/lam or check the margins and "
                    "the vector."
                )
            out.loss.backward()
            grad = delta.grad
            if grad is None or not torch.isfinite(grad).all():
                save(step)
                raise TrainingDiverged(
                    f"step {step}: non-finite gradient on the safety prompt; the last good state "
                    f"(step {step}) is in {checkpoint}"
                )
            with torch.no_grad():
                grad.mul_(mask)  # only the ring (border kinds) is trainable
                if optimizer is None:
                    delta.sub_(config.lr * grad.sign())
                else:
                    optimizer.step()
                if config.kind == "border":
                    if prompt.clamp:  # the reference never clamps (border_clamp=False)
                        delta.clamp_(0, 1)
                else:
                    delta.clamp_(-config.epsilon, config.epsilon)
            delta.grad = None
            record = {
                "step": step + 1,
                "loss": float(out.loss.detach()),
                "projection_loss": out.projection_loss,
                "output_loss": out.output_loss,
                "malicious_output": entry.malicious_output,
                "projection_malicious": _mean(out.projections["malicious"]),
                "projection_benign": _mean(out.projections["benign"]),
                "seconds": round(time.perf_counter() - tick, 3),
            }
            history.append(record)
            done = step + 1
            if (
                config.snapshot_every and done % config.snapshot_every == 0
            ) or done == config.steps:
                snapshots[done] = delta.detach().cpu().clone()
            if done % config.checkpoint_every == 0 or done == last:
                save(done)
            bar.update(1)
            bar.set_postfix(
                loss=f"{record['loss']:.3f}",
                s_mal=_fmt(record["projection_malicious"]),
                s_ben=_fmt(record["projection_benign"]),
            )
            if on_step is not None:
                on_step(done, record)
    trained = VisualSafetyPrompt(
        delta.detach().cpu(), prompt.kind, prompt.width, prompt.epsilon,
        {
            **(metadata or {}),
            "model": adapter.info(),
            "variant": config.variant,
            "config": config.to_json(),
            "steps_done": len(history),
            "final_loss": history[-1]["loss"] if history else None,
            "losses": [h["loss"] for h in history],
        },
        clamp=prompt.clamp, start=prompt.start,
    )  # fmt: skip
    return TrainResult(trained, history, snapshots, start_step, time.perf_counter() - began)


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# ------------------------------------------------------------------------------ measuring


@torch.no_grad()
def projections(
    adapter: VLMAdapter,
    records: Sequence[Record],
    vector: HarmfulnessVector,
    layer: int,
    *,
    prompt: VisualSafetyPrompt | None = None,
    safety_prompt: str | None = None,
    batch_size: int = 8,
) -> np.ndarray:
    """``s = v_l . h_l`` of each record, with a safety prompt applied (None: undefended)."""
    from davsp_lib.models.inputs import iter_batches

    direction = vector.direction(layer, dtype=torch.float32, device=adapter.device)
    scores: list[float] = []
    batches = iter_batches(
        adapter, records, batch_size, safety_prompt=safety_prompt, blank_image=True,
        place=placer_for(prompt, adapter),
    )  # fmt: skip
    for _chunk, images, conversations in batches:
        if prompt is not None:
            images = prompt.apply(images)
        states = adapter.hidden_states(images, conversations, [layer])[:, 0]
        scores += (states.float() @ direction).tolist()
    return np.array(scores)


# ------------------------------------------------------------------------------ data choice


@dataclass
class TrainingRecords:
    """Training and held-out records per class (all image inputs), and how they were chosen."""

    source: str
    malicious: list[Record]
    benign: list[Record]
    heldout_malicious: list[Record]
    heldout_benign: list[Record]
    notes: list[str] = field(default_factory=list)

    def sizes(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in self._parts}

    def ids(self) -> dict[str, list[str]]:
        return {name: [r.id for r in getattr(self, name)] for name in self._parts}

    _parts = ("malicious", "benign", "heldout_malicious", "heldout_benign")


def training_records(
    root: str | Path | None,
    *,
    n_train: int,
    n_heldout: int,
    n_mmvet: int = 0,
    seed: int = 0,
    exclude: Sequence[str] = (),
) -> TrainingRecords:
    """FigStep-style images of text-prompt instructions (+ MM-Vet photos as extra benign).

    Malicious training inputs are ``harmful_train`` instructions rendered FigStep-style (the
    attack DAVSP defends against; the query is FigStep's fixed prompt), benign ones
    ``harmless_train`` rendered the same way, so the two classes differ only in what the image
    says; ``n_mmvet`` MM-Vet questions (photos, reference answers) are added to the benign side.
    Held-out: ``harmful_val`` / ``harmless_val`` rendered the same way. Records whose id is in
    ``exclude`` (e.g. the vector's data) are not used. Sizes are per class; from the mirror, a
    size larger than what is left raises :class:`~davsp_lib.data.pools.PoolError` (never a silent
    clamp). ``root=None``: the built-in dataset is split instead, sizes reduced with a note.
    """
    from davsp_lib.data.datasets import as_image_attack, load_builtin, load_mmvet, load_text_prompts
    from davsp_lib.data.splits import make_splits
    from davsp_lib.method.diagnostics import clamp_count, require_count, take_subset

    notes: list[str] = []
    skip = set(exclude)
    if root is None:
        notes.append("no benchmark mirror: using the built-in dataset (40 + 40 FigStep images)")
        data = load_builtin("figstep")
        parts: dict[str, list[Record]] = {}
        for label in ("malicious", "benign"):
            records = [r for r in data if r.label.value == label and r.id not in skip]
            n_held = clamp_count(n_heldout, len(records) // 2, f"built-in held-out {label}", notes)
            n_tr = clamp_count(n_train, len(records) - n_held, f"built-in train {label}", notes)
            split = make_splits(records, {"heldout": n_held, "train": n_tr}, seed)
            parts[label] = split.select(records, "train")
            parts[f"heldout_{label}"] = split.select(records, "heldout")
        return TrainingRecords(
            "built-in", parts["malicious"], parts["benign"], parts["heldout_malicious"],
            parts["heldout_benign"], notes,
        )  # fmt: skip
    chosen = {}
    for split, n, salt in (
        ("harmful_train", n_train, "train"), ("harmless_train", n_train, "train"),
        ("harmful_val", n_heldout, "heldout"), ("harmless_val", n_heldout, "heldout"),
    ):  # fmt: skip
        records = [r for r in load_text_prompts(root, split) if r.id not in skip]
        what = f"training data from text-prompts {split} ({len(skip)} ids excluded)"
        count = require_count(n, len(records), what)
        chosen[split] = list(as_image_attack(take_subset(records, count, seed, salt), "figstep"))
    benign = chosen["harmless_train"]
    if n_mmvet:
        mmvet = list(load_mmvet(root))
        benign += take_subset(
            mmvet, require_count(n_mmvet, len(mmvet), "MM-Vet training data"), seed, "train"
        )
    return TrainingRecords(
        "text-prompts rendered FigStep-style (mirror)" + (" + MM-Vet" if n_mmvet else ""),
        chosen["harmful_train"], benign, chosen["harmful_val"], chosen["harmless_val"], notes,
    )  # fmt: skip


def training_records_from_pools(pools: Pools, *, n_heldout: int, seed: int = 0) -> TrainingRecords:
    """Notebook 02's records from a preset's pools (:mod:`davsp_lib.data.pools`): the whole training
    pool, and ``n_heldout`` held-out records per class from the evaluation pool
    (MM-SafetyBench TYPO malicious, MM-Vet benign) for the before/after projections."""
    from davsp_lib.data.pools import take

    train, held = pools["training"], pools["evaluation"]
    return TrainingRecords(
        f"{pools.spec} pools (mirror)",
        train.malicious(),
        train.benign(),
        take(held, "MM-SafetyBench TYPO", n_heldout, seed=seed),
        take(held, "MM-Vet", n_heldout, seed=seed),
        notes=[f"substitution: {s}" for s in train.substitutions],
    )

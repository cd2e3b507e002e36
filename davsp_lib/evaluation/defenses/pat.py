"""PAT baseline: Prompt Adversarial Tuning (Mo et al., "Fight Back Against Jailbreaking via
Prompt Adversarial Tuning", NeurIPS 2024, arXiv 2402.06255; official code github.com/PKU-ML/PAT,
whose code is file for file the same as the first author's copy github.com/rain152/PAT).

The DAVSP paper's tables (Tables 1 and 2, also in its repository's ``assets/``) list a baseline
"PAT"; its reference list was not readable here, so the identification rests on the name, the
field (jailbreak defense by a tuned prompt) and the absence of another method of that name.

PAT trains a *defense control*: a short string of discrete tokens put before the user's
request. Each step alternates, as in the reference ``MultiPromptAttack.run``:

1. **attack step** (GCG): an adversarial suffix after the malicious request is updated to make
   an affirmative target likely (the attacker the defense is hardened against);
2. **defense step** (GCG on the control): candidates come from the gradient of the refusal loss
   alone (the reference's ``PromptManager.def_grad`` sums over the refusal prompts only), and
   the kept one minimises
   ``refusal_weight * CE(refusal | control + request + suffix)`` on malicious inputs
   ``+ benign_weight * CE(benign answer | control + benign request)`` on benign ones
   (reference: ``refuse_target_weight = 1 - benign_weight``, ``benign_weight = 0.2``,
   ``target_weight = 0``).

A GCG step takes the gradient of the loss with respect to the one-hot tokens of the control
(here: the gradient on the input embeddings times the embedding matrix, which is the same
thing), samples ``candidates`` single-token substitutions among each position's ``topk``
tokens, and keeps the candidate with the lowest loss. Non-ASCII and special tokens are not
allowed (nor whitespace-only ones, which would merge with their neighbours), and a candidate
whose text does not tokenize back to itself is dropped (the reference's
``allow_non_ascii=False`` and ``filter_cand``).

For vision-language models the records keep their image (FigStep-style typography for the
malicious side); the control is a text prefix followed by a space, as the reference's
``f"{def_control} {goal} {control}"`` (:func:`prompt_text`), so the defense is a text prompt at
evaluation time. Checkpoints reuse :func:`davsp_lib.method.training.save_checkpoint`; a rerun
resumes and ends bit-identical, because every random draw is seeded by (seed, step).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from davsp_lib.method.training import (
    CHECKPOINT_NAME,
    TrainingSet,
    resume_checkpoint,
    save_checkpoint,
)
from davsp_lib.models.adapters.base import IGNORE_INDEX, VLMAdapter
from davsp_lib.models.conversation import Conversation
from davsp_lib.runtime.errors import DataError
from davsp_lib.runtime.io import atomic_write_bytes, atomic_write_json, read_json

PAT_FORMAT = "davsp-pat-control/1"
#: the reference's initial controls are runs of "!" tokens
INIT_TOKEN = "!"
#: between the control and the request (the reference: ``f"{def_control} {goal}"``)
CONTROL_SEPARATOR = " "
REFERENCE_CODE = "github.com/PKU-ML/PAT"


def prompt_text(control_text: str) -> str:
    """The text prompt a control becomes, in training and at evaluation (prefix placement)."""
    return f"{control_text}{CONTROL_SEPARATOR}"


@dataclass(frozen=True)
class PATConfig:
    """Everything that determines a PAT run (its hash guards resume)."""

    steps: int = 100  # reference: n_steps = 100
    control_len: int = 15  # reference launch scripts: 15 tokens
    attack_len: int = 20  # reference: control_init "! ! ..." (20 tokens)
    candidates: int = 256  # reference: batch_size = 256 candidates per step
    topk: int = 256  # reference: topk = 256
    benign_weight: float = 0.2  # reference: 0.2
    refusal_weight: float = 0.8  # reference: 1 - benign_weight
    attack: bool = True  # alternate with a GCG attacker (the "adversarial" in PAT)
    attack_target: str = "Sure, here is"  # affirmative prefix the attacker aims for
    batch_size: int = 4  # malicious and benign records per step (each)
    eval_batch: int = 8  # rows per forward when scoring candidates
    checkpoint_every: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "control_len", "attack_len", "candidates", "topk", "batch_size",
                     "eval_batch", "checkpoint_every"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.benign_weight < 0 or self.refusal_weight < 0:
            raise ValueError("benign_weight and refusal_weight must be >= 0")
        if not self.attack_target.strip():
            raise ValueError("attack_target must be a non-empty string")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PATControl:
    """A trained defense control: its token ids, its text (what evaluation prepends), metadata."""

    ids: torch.Tensor
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """``path.safetensors`` (token ids) then ``path.json`` (text, sha256, metadata)."""
        from safetensors.torch import save as to_bytes

        base = Path(path)
        tensor_path, json_path = base.with_suffix(".safetensors"), base.with_suffix(".json")
        json.dumps(self.metadata)  # fail before writing if not JSON-safe
        data = to_bytes({"control_ids": self.ids.to(torch.int64).contiguous()},
                        metadata={"format": PAT_FORMAT})  # fmt: skip
        atomic_write_bytes(tensor_path, data)
        atomic_write_json(json_path, {
            "format": PAT_FORMAT,
            "text": self.text,
            "tensors": {"file": tensor_path.name, "sha256": hashlib.sha256(data).hexdigest()},
            "metadata": self.metadata,
        })  # fmt: skip
        return tensor_path, json_path

    @classmethod
    def load(cls, path: str | Path, adapter: VLMAdapter | None = None) -> PATControl:
        """Read a saved control; a bad file or another model's control raises DataError."""
        from safetensors.torch import load as from_bytes

        base = Path(path)
        tensor_path, json_path = base.with_suffix(".safetensors"), base.with_suffix(".json")
        if not json_path.exists():
            raise DataError(json_path, "PAT control metadata file not found")
        header = read_json(json_path)
        if not isinstance(header, dict) or header.get("format") != PAT_FORMAT:
            raise DataError(json_path, f"not a PAT control (expected format {PAT_FORMAT!r})")
        if not isinstance(header.get("text"), str) or not header["text"]:
            raise DataError(json_path, "PAT control has no text")
        try:
            data = tensor_path.read_bytes()
        except FileNotFoundError:
            raise DataError(tensor_path, "PAT control tensor file not found") from None
        if hashlib.sha256(data).hexdigest() != header.get("tensors", {}).get("sha256"):
            raise DataError(tensor_path, f"sha256 differs from the one in {json_path.name}")
        try:
            ids = from_bytes(data)["control_ids"]
        except Exception as exc:
            raise DataError(tensor_path, f"not a readable PAT control ({exc})") from None
        control = cls(ids, header["text"], dict(header.get("metadata") or {}))
        made_for = control.metadata.get("model", {}).get("model_id")
        if adapter is not None and made_for != adapter.info()["model_id"]:
            raise DataError(
                json_path,
                f"PAT control trained on {made_for!r}, not {adapter.info()['model_id']!r} "
                "(its tokens are model-specific)",
            )
        return control


@dataclass
class PATResult:
    control: PATControl
    history: list[dict[str, Any]]
    resumed_from: int
    seconds: float


# ------------------------------------------------------------------------------ tokens


def embedding_layer(adapter: VLMAdapter) -> torch.nn.Module:
    """The language model's token embedding (the module every text token passes through)."""
    return adapter.decoder.get_input_embeddings()


@functools.lru_cache(maxsize=4)
def disallowed_tokens(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """Token ids a control may not use: special and added tokens, non-ASCII or non-printable
    text, newlines."""
    banned = torch.zeros(vocab_size, dtype=torch.bool)
    texts = tokenizer.batch_decode([[i] for i in range(min(vocab_size, len(tokenizer)))])
    for index, text in enumerate(texts):
        if not text.strip() or not (text.isascii() and text.isprintable()):
            banned[index] = True
    banned[len(texts) :] = True
    # specials, and added tokens that are not flagged special (e.g. Qwen's <|fim_pad|>)
    for special in [*tokenizer.all_special_ids, *getattr(tokenizer, "added_tokens_decoder", {})]:
        if 0 <= special < vocab_size:
            banned[special] = True
    return banned


def initial_ids(adapter: VLMAdapter, length: int, fits: Callable[[list[int]], bool]) -> list[int]:
    """``length`` initial tokens: the reference's ``"! ! ! ..."`` where the tokenizer keeps it
    intact in the prompt (``fits``: the ids appear verbatim in the model input), else a run of
    another single token (``" !"``, ``"x"``, ``" x"``): byte-level BPE tokenizers merge a
    trailing ``"!"`` with the newline after it, which would leave no span to optimise."""
    tokenize = functools.partial(adapter.tokenizer, add_special_tokens=False)
    tries = [list(tokenize(" ".join([INIT_TOKEN] * length))["input_ids"])]
    for text in (INIT_TOKEN, f" {INIT_TOKEN}", "x", " x"):
        single = list(tokenize(text)["input_ids"])
        if len(single) == 1:
            tries.append(single * length)
    for ids in tries:
        if len(ids) == length and round_trips(adapter, ids) and fits(ids):
            return ids
    raise ValueError(
        f"no {length}-token initial control survives this model's prompt template intact"
    )


def decode(adapter: VLMAdapter, ids: Sequence[int]) -> str:
    return adapter.tokenizer.decode(list(ids))


def round_trips(adapter: VLMAdapter, ids: Sequence[int]) -> bool:
    """The reference's candidate filter: the text tokenizes back to exactly these ids."""
    again = adapter.tokenizer(decode(adapter, ids), add_special_tokens=False)["input_ids"]
    return list(again) == list(ids)


@contextmanager
def captured_embeddings(adapter: VLMAdapter, *, grad: bool) -> Iterator[dict[str, torch.Tensor]]:
    """Keep the token-embedding output of the next call (as a leaf that takes gradients)."""
    store: dict[str, torch.Tensor] = {}

    def hook(_module: torch.nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
        if "embeds" in store:
            return output
        kept = output.detach().requires_grad_(grad)
        store["embeds"] = kept
        return kept

    handle = embedding_layer(adapter).register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def find_span(row: torch.Tensor, pattern: torch.Tensor) -> int | None:
    """First position where ``pattern`` (``[n, d]`` embeddings) occurs in ``row`` (``[L, d]``)."""
    n = pattern.shape[0]
    if n > row.shape[0]:
        return None
    windows = row.unfold(0, n, 1)  # [L - n + 1, d, n]
    hits = (windows == pattern.T[None].to(row.dtype)).all(dim=2).all(dim=1).nonzero()
    return int(hits[0]) if len(hits) else None


# ------------------------------------------------------------------------------ losses


@dataclass(frozen=True)
class Row:
    """One input of a loss: the record's canvas and conversation, its target, its weight."""

    record_id: str
    conversation: Conversation
    target: str
    weight: float


def row_losses(
    adapter: VLMAdapter,
    data: TrainingSet,
    rows: Sequence[Row],
    *,
    locate: Sequence[int] | None = None,
    grad: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-row answer cross-entropy ``[B]``; with ``locate`` (token ids), rows where those ids
    do not appear verbatim in the model input get ``inf`` (their text tokenizes otherwise)."""
    images = torch.stack([data.canvases[r.record_id] for r in rows]).to(adapter.device)
    with captured_embeddings(adapter, grad=grad) as store:
        batch = adapter.encode(images, [r.conversation for r in rows], [r.target for r in rows])
        assert batch.labels is not None
        keep = int((batch.labels != IGNORE_INDEX).sum(1).max()) + 1
        output = adapter.forward(batch, use_cache=False, logits_to_keep=keep)
    logits = output.logits[:, :-1].float()
    labels = batch.labels[:, -(keep - 1) :]
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none",
    ).view(labels.shape)  # fmt: skip
    counts = (labels != IGNORE_INDEX).sum(1).clamp(min=1)
    losses = ce.sum(1) / counts
    if locate is not None:
        table = embedding_layer(adapter).weight
        pattern = table[torch.tensor(list(locate), device=table.device)].detach()
        embeds = store["embeds"].detach()
        found = torch.tensor([find_span(embeds[b], pattern) is not None
                              for b in range(len(rows))], device=losses.device)  # fmt: skip
        losses = torch.where(found, losses, torch.full_like(losses, float("inf")))
    return losses, store


def token_gradient(
    adapter: VLMAdapter, data: TrainingSet, rows: Sequence[Row], ids: Sequence[int]
) -> tuple[torch.Tensor, float]:
    """``d loss / d one-hot`` of the ``ids`` span, ``[n, vocab]`` (summed over rows), and the
    current weighted loss. Raises if the span is not in some row's input."""
    losses, store = row_losses(adapter, data, rows, grad=True)
    weights = torch.tensor([r.weight for r in rows], device=losses.device)
    loss = (weights * losses).sum()
    loss.backward()
    embeds = store["embeds"]
    assert embeds.grad is not None
    table = embedding_layer(adapter).weight
    pattern = table[torch.tensor(list(ids), device=table.device)].detach()
    total = torch.zeros(len(ids), embeds.shape[-1], device=embeds.device)
    found = 0
    for b in range(len(rows)):
        start = find_span(embeds[b].detach(), pattern)
        if start is not None:  # elsewhere the text merged with its neighbours: no token span
            total += embeds.grad[b, start : start + len(ids)].float()
            found += 1
    if not found:
        raise DataError(
            rows[0].record_id,
            f"the optimised tokens {decode(adapter, ids)!r} appear verbatim in no model input "
            "of this step (the chat template merges them with their neighbours)",
        )
    return total @ table.detach().float().T, float(loss.detach())


def sample_candidates(
    grad: torch.Tensor, ids: torch.Tensor, count: int, topk: int, banned: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:  # fmt: skip
    """GCG: ``count`` copies of ``ids``, each with one position set to a top-k token of ``-grad``
    (positions spread evenly over the span, tokens drawn at random)."""
    grad = grad.clone().cpu()
    grad[:, banned[: grad.shape[1]]] = float("inf")
    top = (-grad).topk(min(topk, grad.shape[1]), dim=1).indices  # [n, k]
    n = ids.shape[0]
    positions = (torch.arange(count) * n // count).long()
    picks = torch.randint(0, top.shape[1], (count,), generator=generator)
    values = top[positions, picks]
    candidates = ids.repeat(count, 1)
    candidates[torch.arange(count), positions] = values
    return candidates


def best_candidate(
    adapter: VLMAdapter,
    data: TrainingSet,
    candidates: torch.Tensor,
    rows_for: Callable[[str], list[Row]],
    eval_batch: int,
) -> tuple[list[int] | None, float]:
    """The candidate with the lowest weighted loss (``rows_for(text) -> rows``), or None."""
    best, best_loss = None, float("inf")
    seen: set[tuple[int, ...]] = set()
    for candidate in candidates.tolist():
        key = tuple(candidate)
        if key in seen or not round_trips(adapter, candidate):
            continue
        seen.add(key)
        rows = rows_for(decode(adapter, candidate))
        total = 0.0
        for start in range(0, len(rows), eval_batch):
            chunk = rows[start : start + eval_batch]
            with torch.no_grad():
                losses, _ = row_losses(adapter, data, chunk, locate=candidate)
            total += float(sum(r.weight * float(v) for r, v in zip(chunk, losses, strict=True)))
        if total < best_loss:
            best, best_loss = candidate, total
    return best, best_loss


# ------------------------------------------------------------------------------ the loop


def _draw(n: int, count: int, seed: int, step: int, stream: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step * 7919 + stream)
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i % n] for i in range(count)]


def _fingerprint(config: PATConfig, data: TrainingSet, adapter: VLMAdapter) -> str:
    payload = json.dumps([config.to_json(), data.fingerprint(), adapter.info()["model_id"]])
    return hashlib.sha256(payload.encode()).hexdigest()


def train(
    adapter: VLMAdapter,
    data: TrainingSet,
    config: PATConfig,
    out_dir: str | Path,
    *,
    metadata: dict[str, Any] | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> PATResult:
    """Train (or resume) a PAT defense control on ``data`` (malicious answers: the refusal
    target; benign answers: references or the undefended model's own answers)."""
    if not data.malicious or not data.benign:
        raise ValueError("PAT needs malicious and benign training records")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = embedding_layer(adapter).weight.shape[0]
    banned = disallowed_tokens(adapter.tokenizer, vocab)
    fingerprint = _fingerprint(config, data, adapter)
    history: list[dict[str, Any]] = []
    start_step = 0
    control = attack = torch.zeros(0, dtype=torch.int64)
    checkpoint = out_dir / CHECKPOINT_NAME
    resumed = resume_checkpoint(
        checkpoint, fingerprint, run="PAT ", changed="config, data or model"
    )
    if resumed is not None:
        tensors, state = resumed
        both = tensors["delta"]
        control, attack = both[: config.control_len].clone(), both[config.control_len :].clone()
        history, start_step = state["history"], int(state["step"])

    def save(step: int) -> None:
        state = {"fingerprint": fingerprint, "step": step, "history": history,
                 "config": config.to_json()}  # fmt: skip
        save_checkpoint(checkpoint, torch.cat([control, attack]), None, state, {})

    def malicious_rows(indices: list[int], control_text: str, suffix: str | None, *,
                       target: str | None, weight: float) -> list[Row]:  # fmt: skip
        rows = []
        for i in indices:
            record = data.malicious[i]
            conv = data.conversations[record.id]
            query = conv.query if suffix is None else f"{conv.query} {suffix}"
            conv = dataclasses.replace(conv, query=query, safety_prompt=prompt_text(control_text),
                                       safety_placement="prefix")  # fmt: skip
            rows.append(Row(record.id, conv, target or data.answers[record.id], weight))
        return rows

    def benign_rows(indices: list[int], control_text: str) -> list[Row]:
        rows = []
        for i in indices:
            record = data.benign[i]
            conv = dataclasses.replace(data.conversations[record.id],
                                       safety_prompt=prompt_text(control_text),
                                       safety_placement="prefix")  # fmt: skip
            rows.append(Row(record.id, conv, data.answers[record.id], config.benign_weight))
        return rows

    def both_rows(mal: list[int], ben: list[int], suffix: str | None, text: str) -> list[Row]:
        """The defense loss's rows: refusals on attacked malicious inputs, benign answers."""
        rows = malicious_rows(mal, text, suffix, target=None, weight=config.refusal_weight)
        return rows + (benign_rows(ben, text) if config.benign_weight > 0 else [])

    def benign_loss(ben: list[int], control_text: str) -> float:
        if config.benign_weight == 0:
            return 0.0
        rows = benign_rows(ben, control_text)
        with torch.no_grad():
            losses, _ = row_losses(adapter, data, rows)
        return float(sum(r.weight * float(v) for r, v in zip(rows, losses, strict=True)))

    def fits(rows: list[Row], ids: list[int]) -> bool:
        with torch.no_grad():
            losses, _ = row_losses(adapter, data, rows, locate=ids)
        return bool(torch.isfinite(losses).all())

    if not checkpoint.is_file():  # the initial tokens must survive the template (both players)
        control = torch.tensor(initial_ids(adapter, config.control_len, lambda ids: fits(
            both_rows([0], [0], None, decode(adapter, ids)), ids)))  # fmt: skip
        attack = torch.tensor(initial_ids(adapter, config.attack_len, lambda ids: fits(
            malicious_rows([0], decode(adapter, control.tolist()), decode(adapter, ids),
                           target=config.attack_target, weight=1.0), ids)))  # fmt: skip
    last = min(config.steps, stop_after if stop_after is not None else config.steps)
    began = time.perf_counter()
    bar = tqdm(total=config.steps, initial=start_step, desc="pat", disable=not progress)
    with bar:
        for step in range(start_step, last):
            tick = time.perf_counter()
            mal = _draw(len(data.malicious), config.batch_size, config.seed, step, 1)
            ben = _draw(len(data.benign), config.batch_size, config.seed, step, 2)
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            control_text = decode(adapter, control.tolist())
            attack_loss = None
            if config.attack:  # 1. the attacker's GCG step on the suffix
                suffix = decode(adapter, attack.tolist())
                rows = malicious_rows(mal, control_text, suffix, target=config.attack_target,
                                      weight=1.0)  # fmt: skip
                grad, attack_loss = token_gradient(adapter, data, rows, attack.tolist())
                cands = sample_candidates(grad, attack, config.candidates, config.topk, banned,
                                          generator)  # fmt: skip
                rows_for = functools.partial(
                    malicious_rows, mal, control_text, target=config.attack_target, weight=1.0
                )
                chosen, _ = best_candidate(adapter, data, cands, rows_for, config.eval_batch)
                if chosen is not None:
                    attack = torch.tensor(chosen)
            suffix = decode(adapter, attack.tolist()) if config.attack else None

            defense_rows = functools.partial(both_rows, mal, ben, suffix)

            # 2. the defender's GCG step on the control: candidates from the refusal gradient
            # alone (unweighted, as the reference's def_grad), chosen by the whole defense loss
            refusals = malicious_rows(mal, control_text, suffix, target=None, weight=1.0)
            grad, refusal_loss = token_gradient(adapter, data, refusals, control.tolist())
            before = config.refusal_weight * refusal_loss + benign_loss(ben, control_text)
            if not torch.isfinite(grad).all():
                save(step)
                raise RuntimeError(f"PAT step {step}: non-finite gradient; state saved")
            cands = sample_candidates(grad, control, config.candidates, config.topk, banned,
                                      generator)  # fmt: skip
            chosen, after = best_candidate(adapter, data, cands, defense_rows, config.eval_batch)
            if chosen is not None:
                control = torch.tensor(chosen)
            history.append({
                "step": step + 1,
                "loss": after if chosen is not None else before,
                "loss_before": before,
                "attack_loss": attack_loss,
                "control": decode(adapter, control.tolist()),
                "seconds": round(time.perf_counter() - tick, 3),
            })  # fmt: skip
            done = step + 1
            if done % config.checkpoint_every == 0 or done == last:
                save(done)
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
    text = decode(adapter, control.tolist())
    result = PATControl(control.clone(), text, {
        **(metadata or {}),
        "method": f"PAT (Mo et al., NeurIPS 2024; reference code {REFERENCE_CODE})",
        "model": adapter.info(),
        "config": config.to_json(),
        "attack_suffix": decode(adapter, attack.tolist()) if config.attack else None,
        "steps_done": len(history),
        "losses": [h["loss"] for h in history],
    })  # fmt: skip
    return PATResult(result, history, start_step, time.perf_counter() - began)


def defense_fields(path: Path, *, adapter: VLMAdapter | None = None, root: Any = None) -> dict:
    """The PAT defense's parts (:data:`davsp_lib.evaluation.generation.DEFENSES` builder): the
    trained control and a space as a text prefix (no image part)."""
    control = PATControl.load(path, adapter)
    return {
        "safety_prompt": prompt_text(control.text),
        "prompt_name": "pat control (trained)",
        "trained": control,
    }

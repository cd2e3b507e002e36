"""Test-time interventions on the residual stream: steering (``h + alpha v``) and ablation.

- :func:`steer` (activation addition, as in steering-vectors / ActAdd / CAA): add ``alpha * v``
  to the hidden state at layer ``l`` (the output of language block ``l - 1``; layer convention of
  :mod:`davsp_lib.models.adapters.hooks`) of every position, or of the last prompt token only.
- :func:`ablate` (VLM-Guard style): remove the component along a unit direction,
  ``h <- h - (h . v) v``.

Both are context managers around forward hooks on ``adapter.language_layers``; the hooks are
removed on exit, also when the body raises. They work in any forward that runs those blocks:
``adapter.hidden_states``, ``adapter.generate`` (HF models and the embedded model's LM alike),
or a hand-written decoding loop.

Positions during generation. Each forward through the blocks handles a *chunk* of columns
``[offset, offset + length)`` of the (left-padded) sequence, where ``offset`` is the number of
tokens already in the key/value cache handed to the language model's forward (found by its
type, :class:`transformers.Cache`, and read with the public ``get_seq_length()``; no cache: 0):
the prompt pass has ``offset = 0``; a cached decoding step has ``length = 1``; an uncached
recomputation has ``offset = 0`` and the whole sequence.

- ``"all"``: every column of every chunk: the prompt, and each generated token once it is fed
  back in as input. Cached and uncached decoding agree.
- ``"last"``: the last prompt column ``P - 1`` only, never a generated token. ``P`` is
  ``prompt_length`` when given; otherwise it is the length of the latest chunk with
  ``offset = 0`` (the prompt pass of ``generate``), and cached steps (``offset > 0``) are left
  alone. An uncached recomputation must pass ``prompt_length`` (every pass starts at 0, so the
  prompt cannot be told from the generated tokens). With left padding every row's last prompt
  token sits in column ``P - 1``.

Notebook 04's alpha sweep uses :func:`sweep_data` (held-out records), :func:`respond` (batched
greedy answers inside an intervention, with the prompt's state at a layer) and
:func:`resumable` (one stored result per condition, so an interrupted sweep resumes).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from davsp_lib.data.datasets import as_image_attack, load_builtin, load_text_prompts
from davsp_lib.data.records import Record
from davsp_lib.data.splits import make_splits
from davsp_lib.method.vectors import HarmfulnessVector
from davsp_lib.models.adapters.base import VLMAdapter
from davsp_lib.models.adapters.hooks import cache_length, capture_hidden, hidden_of
from davsp_lib.models.inputs import Batch
from davsp_lib.runtime.errors import DataError
from davsp_lib.runtime.io import atomic_write_json, read_json

Positions = Literal["all", "last"]
POSITIONS = ("all", "last")
Edit = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Intervention:
    """What one :func:`steer` / :func:`ablate` context did, for inspection and tests.

    ``chunks`` holds ``(offset, length, columns_edited)`` for every forward through the hooked
    block; ``prompt_length`` is the fixed or the latest detected prompt length.
    """

    kind: str
    layer: int
    positions: Positions
    prompt_length: int | None = None
    fixed_prompt_length: bool = False
    chunks: list[tuple[int, int, int]] = field(default_factory=list)
    offset: int = 0  #: cache length at the start of the current forward

    @property
    def edited_columns(self) -> int:
        return sum(edited for _, _, edited in self.chunks)


def _check_target(adapter: VLMAdapter, layer: int, positions: str) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an int, got {type(layer).__name__}")
    if not 1 <= layer <= adapter.num_layers:
        raise ValueError(
            f"layer {layer} cannot be edited: interventions act on block outputs, layers "
            f"1..{adapter.num_layers} of this model (layer 0 is the embeddings)"
        )
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    return layer


def _check_vector(adapter: VLMAdapter, vector: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(vector, torch.Tensor) or vector.shape != (adapter.hidden_size,):
        shape = tuple(vector.shape) if isinstance(vector, torch.Tensor) else type(vector).__name__
        raise ValueError(f"{name} must be a tensor [{adapter.hidden_size}], got {shape}")
    if not vector.is_floating_point() or not torch.isfinite(vector).all():
        raise ValueError(f"{name} must be a finite floating-point tensor")
    return vector.detach().to(torch.float64)


@contextmanager
def _intervene(
    adapter: VLMAdapter,
    layer: int,
    positions: Positions,
    edit: Edit,
    prompt_length: int | None,
    kind: str,
) -> Iterator[Intervention]:
    """Apply ``edit`` to the chosen columns of block ``layer - 1``'s output hidden state."""
    layer = _check_target(adapter, layer, positions)
    if prompt_length is not None and (
        isinstance(prompt_length, bool) or not isinstance(prompt_length, int) or prompt_length < 1
    ):
        raise ValueError(f"prompt_length must be a positive int, got {prompt_length!r}")
    state = Intervention(
        kind=kind,
        layer=layer,
        positions=positions,
        prompt_length=prompt_length,
        fixed_prompt_length=prompt_length is not None,
    )
    blocks = adapter.language_layers

    def read_offset(module, args, kwargs):
        # as the language model starts, its cache holds only earlier chunks: their length
        state.offset = cache_length(args, kwargs)

    def edit_output(module, args, output):
        hidden = hidden_of(output)
        length = hidden.shape[1]
        offset = state.offset
        if positions == "all":
            new, edited = edit(hidden), length
        else:
            if offset == 0 and not state.fixed_prompt_length:
                state.prompt_length = length
            if state.prompt_length is None:
                raise RuntimeError(
                    "positions='last' entered during a cached generation (offset "
                    f"{offset}): the prompt length is unknown; pass prompt_length"
                )
            column = state.prompt_length - 1 - offset
            if 0 <= column < length:
                new = hidden.clone()
                new[:, column] = edit(hidden[:, column])
                edited = 1
            else:
                new, edited = hidden, 0
        state.chunks.append((offset, length, edited))
        if isinstance(output, tuple):
            return (new, *output[1:])
        return new

    handles = [
        adapter.language_model.register_forward_pre_hook(read_offset, with_kwargs=True),
        blocks[layer - 1].register_forward_hook(edit_output),
    ]
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()


def steer(
    adapter: VLMAdapter,
    vector: torch.Tensor,
    layer: int,
    alpha: float,
    positions: Positions = "all",
    *,
    prompt_length: int | None = None,
) -> AbstractContextManager[Intervention]:
    """Context manager: ``h_l <- h_l + alpha * vector`` at ``positions`` (see the module doc).

    ``vector`` ``[hidden_size]`` is used as given (a harmfulness direction is unit norm, so
    ``alpha`` is then the shift of the projection ``v . h``). ``alpha * vector`` is formed in
    float64 and cast once to the hidden state's dtype. Yields an :class:`Intervention`.
    """
    direction = _check_vector(adapter, vector, "vector")
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    shift = alpha * direction
    cast: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def add(hidden: torch.Tensor) -> torch.Tensor:
        key = (hidden.dtype, hidden.device)
        if key not in cast:
            cast[key] = shift.to(device=hidden.device, dtype=hidden.dtype)
        return hidden + cast[key]

    return _intervene(adapter, layer, positions, add, prompt_length, f"steer alpha={alpha:g}")


def ablate(
    adapter: VLMAdapter,
    vector: torch.Tensor,
    layer: int,
    positions: Positions = "all",
    *,
    prompt_length: int | None = None,
) -> AbstractContextManager[Intervention]:
    """Context manager: ``h_l <- h_l - (h_l . u) u`` with ``u = vector / |vector|`` (VLM-Guard).

    Computed in at least float32 and cast back, so the projection left is at the rounding level
    of the hidden state's dtype. A zero vector is refused. Yields an :class:`Intervention`.
    """
    direction = _check_vector(adapter, vector, "vector")
    norm = float(direction.norm())
    if norm == 0:
        raise ValueError("cannot ablate a zero vector (no direction)")
    unit = direction / norm

    def remove(hidden: torch.Tensor) -> torch.Tensor:
        work = torch.promote_types(hidden.dtype, torch.float32)
        h = hidden.to(work)
        u = unit.to(device=hidden.device, dtype=work)
        return (h - (h @ u)[..., None] * u).to(hidden.dtype)

    return _intervene(adapter, layer, positions, remove, prompt_length, "ablate")


def alpha_unit(vector: HarmfulnessVector, layer: int) -> float:
    """The unit of an alpha sweep at ``layer``: ``d_l = |mean_malicious - mean_benign|``.

    ``alpha = k * d_l`` moves a last-token state's projection by ``k`` times the distance
    between the two class means: ``k = 1`` takes the benign mean's projection to the malicious
    mean's. Refused where the means coincide (no scale).
    """
    row = vector.row(layer)
    value = float((vector.mean_malicious[row] - vector.mean_benign[row]).norm())
    if not value > 0:
        raise ValueError(f"layer {layer}: the class means coincide, no scale for alpha")
    return value


# ------------------------------------------------------------------------------ the sweep

#: the evaluation sets of the alpha sweep (notebook 04)
SET_NAMES = ("malicious_figstep", "benign_figstep", "malicious_text")


@dataclass
class SweepData:
    """Records per evaluation set; ``malicious_text`` holds the first ``n_text`` malicious
    instructions of ``malicious_figstep`` as plain text queries (the vector's own format)."""

    source: str
    sets: dict[str, list[Record]]
    notes: list[str] = field(default_factory=list)

    def ids(self) -> dict[str, list[str]]:
        return {name: [r.id for r in records] for name, records in self.sets.items()}

    def sizes(self) -> dict[str, int]:
        return {name: len(records) for name, records in self.sets.items()}


def _pick(records: list[Record], n: int, seed: int, what: str, notes: list[str]) -> list[Record]:
    if n > len(records):
        notes.append(f"{what}: {n} requested, {len(records)} available; using {len(records)}")
        n = len(records)
    if n == 0:
        return []
    return make_splits(records, {"sweep": n}, seed).select(records, "sweep")


def sweep_data(
    root: str | Path | None,
    *,
    n_malicious: int,
    n_benign: int,
    n_text: int,
    seed: int,
    exclude_ids: Sequence[str] = (),
) -> SweepData:
    """Held-out instructions for the sweep, rendered FigStep-style (FigStep's query).

    With a data root: text-prompts ``harmful_val`` / ``harmless_val``; without (``None``): the
    built-in instructions. Records sharing a group with ``exclude_ids`` (the vector's own
    data) are left out. Picks are seeded and group-aware.
    """
    notes: list[str] = []
    builtin = list(load_builtin("text"))
    if root is None:
        source = "built-in"
        pool = {
            "malicious": [r for r in builtin if r.is_malicious],
            "benign": [r for r in builtin if not r.is_malicious],
        }
        known = builtin
    else:
        source = "text-prompts harmful_val / harmless_val (mirror)"
        pool = {
            "malicious": list(load_text_prompts(root, "harmful_val")),
            "benign": list(load_text_prompts(root, "harmless_val")),
        }
        known = [r for split in ("harmful_train", "harmless_train")
                 for r in load_text_prompts(root, split)]  # fmt: skip
        known += pool["malicious"] + pool["benign"]
    group_of = {r.id: r.group_key for r in known + builtin}
    excluded = {group_of[i] for i in exclude_ids if i in group_of}
    if excluded:
        for label, records in pool.items():
            kept = [r for r in records if r.group_key not in excluded]
            if len(kept) < len(records):
                notes.append(f"{label}: {len(records) - len(kept)} records left out (vector data)")
            pool[label] = kept
    malicious = _pick(pool["malicious"], n_malicious, seed, "malicious", notes)
    benign = _pick(pool["benign"], n_benign, seed, "benign", notes)
    if n_text > len(malicious):
        notes.append(f"malicious_text: {n_text} requested, {len(malicious)} malicious; using all")
    sets = {
        "malicious_figstep": list(as_image_attack(malicious, "figstep")),
        "benign_figstep": list(as_image_attack(benign, "figstep")),
        "malicious_text": malicious[:n_text],
    }
    return SweepData(source=source, sets=sets, notes=notes)


@dataclass
class Responses:
    """Answers in input order, and (when asked) the last-input-token state of each prompt at
    ``layer`` as the model saw it, i.e. after any intervention (float64, CPU, ``[N, D]``)."""

    texts: list[str]
    layer: int | None = None
    states: torch.Tensor | None = None


def respond(
    adapter: VLMAdapter,
    batches: Iterable[Batch],
    *,
    max_new_tokens: int,
    intervention: Callable[[], AbstractContextManager] | None = None,
    state_layer: int | None = None,
    progress: bool = True,
    desc: str = "generate",
) -> Responses:
    """Greedy answers for ``(records, images, conversations)`` batches (:func:`iter_batches`),
    inside ``intervention()`` when given (a factory, e.g. ``lambda: steer(...)``; one context
    spans all batches). With ``state_layer``, also the prompt's last-token state there.
    """
    if state_layer is not None:
        _check_target(adapter, state_layer, "last")
    batches = list(batches)
    texts: list[str] = []
    states: list[torch.Tensor] = []
    context = intervention() if intervention is not None else nullcontext()
    total = sum(len(chunk) for chunk, _, _ in batches)
    with (
        context,
        tqdm(total=total, desc=desc, unit="rec", disable=not progress) as bar,
    ):
        for chunk, images, conversations in batches:
            capture = (
                capture_hidden(adapter.language_layers, [state_layer], first_forward_only=True)
                if state_layer is not None
                else nullcontext({})
            )
            with capture as store:
                texts += adapter.generate(images, conversations, max_new_tokens=max_new_tokens)
            if state_layer is not None:
                states.append(store[state_layer].detach().to("cpu", torch.float64))
            bar.update(len(chunk))
    return Responses(
        texts=texts,
        layer=state_layer,
        states=torch.cat(states) if states else None,
    )


def resumable(
    path: str | Path, key: Mapping[str, Any], compute: Callable[[], Any]
) -> tuple[Any, bool]:
    """``(value, reused)``: ``compute()``'s JSON-safe value, stored at ``path`` with ``key``; a
    later call with the same key reads it back instead (``reused``: a long sweep resumes where
    it stopped). A file with another
    key is recomputed and replaced; an unreadable one raises :class:`DataError`.
    """
    path = Path(path)
    key = json.loads(json.dumps(key, default=str))
    if path.exists():
        stored = read_json(path)
        if not isinstance(stored, dict) or "key" not in stored or "value" not in stored:
            raise DataError(path, "expected an object with 'key' and 'value' (a resumable step)")
        if stored["key"] == key:
            return stored["value"], True
    value = compute()
    atomic_write_json(path, {"key": key, "value": value})
    return value, False

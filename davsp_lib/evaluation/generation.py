"""Defenses and batched, resumable generation: the responses every evaluation number comes from.

- :class:`Defense`: a text part (a safety prompt from ``prompts.json`` and where it goes), an
  optional image part (a trained :class:`~davsp_lib.method.vsp.VisualSafetyPrompt`, border or
  additive) and an optional per-record query rewrite (AdaShield-A's retrieved prompt).
  :func:`load_defenses` builds the standard set (no defense, AdaShield-S/-A, UniGuard, DAVSP and its
  ablations, ESIII and PAT, whose builders live in :mod:`davsp_lib.evaluation.defenses.adashield`,
  :mod:`davsp_lib.evaluation.defenses.esiii` / :mod:`davsp_lib.evaluation.defenses.pat`) from a
  training folder, skipping (with a note) the trained ones whose artifact is missing.
- :func:`generate_responses`: greedy, batched generation through any adapter with a defense
  applied; one JSON line per record, flushed and fsynced per batch. A rerun on the same file
  validates it and continues with the missing records only, so an interrupted run ends with
  exactly the bytes of an uninterrupted one (batches keep their composition on resume, because
  left padding and batch size can change greedy outputs in the last bits).
- Optionally, the projection ``v_l . h_l`` of each input's last token on the harmfulness vector
  is read from the prefill of the same forward (a hook on the first call only), at no extra cost.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import random
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from davsp_lib.data import prompts
from davsp_lib.data.records import Record
from davsp_lib.method.vsp import VisualSafetyPrompt, placer_for
from davsp_lib.models.adapters.base import VLMAdapter
from davsp_lib.models.adapters.hooks import capture_hidden
from davsp_lib.models.conversation import Conversation, Placement
from davsp_lib.models.inputs import Placer, batch_ranges, iter_batches
from davsp_lib.runtime.errors import DataError
from davsp_lib.runtime.io import atomic_write_text

RESPONSES_FORMAT = "davsp-responses/1"

# ------------------------------------------------------------------------------ defenses


@dataclass(frozen=True)
class DefenseSpec:
    """How a named defense is built: prompt key, placement, trained artifact variant."""

    label: str
    prompt: str | None = None
    placement: Placement = "prefix"
    variant: str | None = None  # ``<training_dir>/<variant>.safetensors/.json``
    #: ``"module:function"`` called as ``f(path, adapter=, root=)`` on the artifact path
    #: ``<training_dir>/<variant>``; it returns the :class:`Defense` fields the artifact gives
    #: (baselines in their own modules, imported when used). Without it the artifact is a VSP.
    builder: str | None = None


#: The standard defenses. The DA-only and VSP-only ablations keep DAVSP's text prefix so that
#: only the image part differs from DAVSP; ``davsp_prefix`` is DAVSP's text part alone and
#: ``davsp_border`` its image part alone.
DEFENSES: dict[str, DefenseSpec] = {
    "none": DefenseSpec("no defense"),
    "adashield_s": DefenseSpec("AdaShield-S", "adashield_static", "sandwich"),
    # Not UniGuard as published (which makes a harmful corpus unlikely, from a random start in
    # +-eps): the noise is trained by DAVSP's loop for a refusal on malicious inputs, then shown
    # with UniGuard's text suffix. The name says so; the key stays for existing artifacts.
    "uniguard": DefenseSpec(
        "UniGuard-style (refusal-trained noise + UniGuard suffix)",
        "uniguard_text_suffix",
        "suffix",
        "uniguard",
    ),
    # UniGuard as published (davsp_lib.evaluation.defenses.uniguard: harmful-corpus likelihood,
    # random start)
    "uniguard_published": DefenseSpec(
        "UniGuard (corpus-trained noise + suffix)",
        "uniguard_text_suffix",
        "suffix",
        "uniguard_published",
    ),
    "davsp": DefenseSpec("DAVSP (border + prefix)", "davsp_safety_prefix", "prefix", "davsp"),
    "da_only": DefenseSpec("DA only (noise + prefix)", "davsp_safety_prefix", "prefix", "da_noise"),
    "vsp_only": DefenseSpec(
        "VSP only (border, output loss + prefix)", "davsp_safety_prefix", "prefix", "vsp_output"
    ),
    "davsp_prefix": DefenseSpec("DAVSP prefix only (text)", "davsp_safety_prefix", "prefix"),
    # the trained border without its text prefix: what the image part does on its own
    "davsp_border": DefenseSpec("DAVSP border only (no prefix)", variant="davsp"),
    # baselines of the paper's table, trained by their own modules (notebook 02)
    "esiii": DefenseSpec(
        "ESIII (defensive image + text)",
        None,
        "prefix",
        "esiii",
        "davsp_lib.evaluation.defenses.esiii:defense_fields",
    ),
    "pat": DefenseSpec(
        "PAT (tuned text prefix)",
        None,
        "prefix",
        "pat",
        "davsp_lib.evaluation.defenses.pat:defense_fields",
    ),
    # a scenario prompt retrieved per input from a pool built by notebook 02 (no image part)
    "adashield_a": DefenseSpec(
        "AdaShield-A (retrieved scenario prompt)",
        None,
        "sandwich",
        "adashield_a",
        "davsp_lib.evaluation.defenses.adashield:defense_fields",
    ),
}


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Defense:
    """A text safety prompt (placed as prefix, suffix or sandwich) and/or a visual one.

    Undefended images go through ``adapter.prepare_image``; with ``vsp`` they go through
    ``vsp.place`` then ``vsp.apply``, as :mod:`davsp_lib.method.training` places them.
    ``prompt_name`` names the ``prompts.json`` entry the text came from; ``source`` is where the VSP
    was loaded from (not part of :meth:`describe`, so a moved artifact still resumes a results
    file).
    """

    name: str
    label: str = ""
    safety_prompt: str | None = None
    placement: Placement = "prefix"
    prompt_name: str | None = None
    vsp: VisualSafetyPrompt | None = field(default=None, compare=False)
    variant: str | None = None
    source: str | None = None
    #: a trained text artifact (e.g. :class:`davsp_lib.evaluation.defenses.pat.PATControl`) with
    #: ``.metadata``
    trained: Any = field(default=None, compare=False)
    #: a per-record query rewrite applied before the inputs are built (AdaShield-A): an object
    #: with ``records(records) -> list[Record]`` (same ids, same order) and ``describe()``
    rewrite: Any = field(default=None, compare=False)

    def placer(self, adapter: VLMAdapter) -> Placer:
        """How a user image reaches the canvas: the VSP's ``place`` (as in training), else the
        adapter's own ``prepare_image``."""
        return placer_for(self.vsp, adapter)

    def apply(self, canvases: torch.Tensor | None) -> torch.Tensor | None:
        """The image part on placed canvases ``[B, 3, H, W]`` (identity without a VSP)."""
        if canvases is None or self.vsp is None:
            return canvases
        return self.vsp.apply(canvases)

    def describe(self) -> dict[str, Any]:
        """JSON-safe identity: what a results file records and checks on resume."""
        text = None
        if self.safety_prompt:
            text = {
                "prompt": self.prompt_name,
                "placement": self.placement,
                "sha256": _sha256_text(self.safety_prompt),
            }
        image = None
        if self.vsp is not None:
            delta = self.vsp.delta.contiguous().cpu().numpy().tobytes()
            image = {
                "variant": self.variant,
                "kind": self.vsp.kind,
                "canvas": list(self.vsp.canvas),
                "width": self.vsp.width if self.vsp.kind == "border" else None,
                "epsilon": self.vsp.epsilon,
                "delta_sha256": hashlib.sha256(delta).hexdigest(),
            }
        out = {"name": self.name, "label": self.label or self.name, "text": text, "image": image}
        if self.rewrite is not None:  # only then, so older results files still resume
            out["rewrite"] = self.rewrite.describe()
        return out

    def rewritten(self, records: Sequence[Record]) -> list[Record]:
        """The records as the model gets them (the rewrite's, else unchanged)."""
        if self.rewrite is None:
            return list(records)
        out = list(self.rewrite.records(records))
        if [r.id for r in out] != [r.id for r in records]:
            raise ValueError(f"defense {self.name!r}: its rewrite changed the records' ids")
        return out


def make_defense(
    name: str,
    *,
    training_dir: str | Path | None = None,
    adapter: VLMAdapter | None = None,
    root: str | Path | None = None,
) -> Defense:
    """One standard defense by name (see :data:`DEFENSES`).

    Trained parts are read from ``<training_dir>/<variant>``; a missing artifact raises
    :class:`DataError` naming the file (:func:`load_defenses` turns that into a skip).
    """
    if name not in DEFENSES:
        raise ValueError(f"unknown defense {name!r}; known: {sorted(DEFENSES)}")
    spec = DEFENSES[name]
    fields: dict[str, Any] = {}
    if spec.prompt:
        fields.update(safety_prompt=prompts.text(spec.prompt, root), prompt_name=spec.prompt)
    if spec.variant is not None:
        if training_dir is None:
            raise ValueError(f"defense {name!r} needs training_dir (artifact {spec.variant!r})")
        path = Path(training_dir) / spec.variant
        if spec.builder is None:
            fields["vsp"] = VisualSafetyPrompt.load(path, adapter)
        else:
            module, function = spec.builder.split(":")
            build = getattr(importlib.import_module(module), function)
            fields.update(build(path, adapter=adapter, root=root))
        fields.update(variant=spec.variant, source=str(path))
    return Defense(name=name, label=spec.label, placement=spec.placement, **fields)


def load_defenses(
    names: Sequence[str],
    *,
    training_dir: str | Path | None,
    adapter: VLMAdapter | None = None,
    root: str | Path | None = None,
) -> tuple[list[Defense], dict[str, str]]:
    """The named defenses that can be built, and ``{name: reason}`` for those skipped.

    Only a trained defense whose artifact files are missing is skipped; a present but bad
    artifact (checksum, canvas) still raises.
    """
    defenses, skipped = [], {}
    for name in names:
        spec = DEFENSES.get(name)
        if spec is None:
            raise ValueError(f"unknown defense {name!r}; known: {sorted(DEFENSES)}")
        if spec.variant is not None:
            base = Path(training_dir or ".") / spec.variant
            files = (base.with_suffix(".json"), base.with_suffix(".safetensors"))
            missing = [str(p) for p in files if not p.exists()] if training_dir else []
            if not training_dir or missing:
                where = ", ".join(missing) or "no training_dir given"
                skipped[name] = f"trained artifact {spec.variant!r} not found ({where})"
                continue
        defenses.append(make_defense(name, training_dir=training_dir, adapter=adapter, root=root))
    return defenses, skipped


@dataclass(frozen=True)
class PooledRecords:
    """The records of several named benchmarks in one list, and where each came from."""

    records: list[Record]
    benchmark_of: dict[str, str]  # record id -> benchmark name
    sizes: dict[str, int]
    n_malicious: int
    n_benign: int

    def describe(self) -> str:
        """``{sizes} -> N malicious + M benign`` (what a notebook prints)."""
        return f"{self.sizes} -> {self.n_malicious} malicious + {self.n_benign} benign"


def pool_benchmarks(
    benchmarks: Mapping[str, Sequence[Record]], *, need_both: bool = False
) -> PooledRecords:
    """All records of ``{name: records}`` in order (what notebooks 03, 05 and 06 evaluate).

    ``need_both``: no malicious or no benign record raises ``ValueError``.
    """
    records = [r for recs in benchmarks.values() for r in recs]
    n_malicious = sum(r.is_malicious for r in records)
    if need_both and (n_malicious == 0 or n_malicious == len(records)):
        sizes = {name: len(recs) for name, recs in benchmarks.items()}
        raise ValueError(
            f"need malicious and benign records, got {n_malicious} and "
            f"{len(records) - n_malicious} ({sizes}); raise the n_* parameters"
        )
    return PooledRecords(
        records=records,
        benchmark_of={r.id: name for name, recs in benchmarks.items() for r in recs},
        sizes={name: len(recs) for name, recs in benchmarks.items()},
        n_malicious=n_malicious,
        n_benign=len(records) - n_malicious,
    )


# ------------------------------------------------------------------------------ batches


def defended_batches(
    adapter: VLMAdapter,
    records: Sequence[Record],
    defense: Defense,
    batch_size: int,
    *,
    system_prompt: str | None = None,
    query_override: str | None = None,
    blank_image: bool = False,
) -> Iterator[tuple[list[Record], torch.Tensor | None, list[Conversation]]]:
    """``(records, images, conversations)`` with the defense's text and image parts applied."""
    batches = iter_batches(
        adapter,
        records,
        batch_size,
        safety_prompt=defense.safety_prompt,
        placement=defense.placement,
        system_prompt=system_prompt,
        query_override=query_override,
        blank_image=blank_image,
        place=defense.placer(adapter),
    )
    for chunk, images, conversations in batches:
        yield chunk, defense.apply(images), conversations


# ------------------------------------------------------------------------------ results files


def records_digest(records: Sequence[Record]) -> str:
    return hashlib.sha256("\n".join(r.id for r in records).encode("utf-8")).hexdigest()


def response_header(
    adapter: VLMAdapter,
    records: Sequence[Record],
    defense: Defense,
    params: Mapping[str, Any],
) -> dict[str, Any]:
    """The first line of a responses file: everything that must match for a resume."""
    return json.loads(
        json.dumps(
            {
                "kind": "header",
                "format": RESPONSES_FORMAT,
                "model": adapter.info(),
                "defense": defense.describe(),
                "params": dict(params),
                "records": {"n": len(records), "ids_sha256": records_digest(records)},
            },
            default=str,
        )
    )


def _dump(obj: Mapping[str, Any]) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")


def _row(record: Record, index: int, defense: Defense, response: str, projection: float | None):
    return {
        "kind": "row",
        "index": index,
        "id": record.id,
        "label": record.label.value,
        "source": record.source,
        "category": record.category,
        "judging": record.meta.get("judging"),
        "defense": defense.name,
        "response": response,
        "projection": projection,
    }


def read_responses(
    path: str | Path, *, drop_torn_tail: bool = False
) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """Parse a responses file: ``(header, rows, complete_bytes)``.

    Anything after the last newline is a torn line from a crash: with ``drop_torn_tail`` it is
    ignored (``complete_bytes`` is where the good part ends), otherwise it is an error. A
    malformed complete line is always a :class:`DataError` naming the file and line.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, "responses file not found") from None
    end = data.rfind(b"\n") + 1
    if end < len(data) and not drop_torn_tail:
        raise DataError(path, "the last line is incomplete (an interrupted run?)")
    lines = data[:end].split(b"\n")[:-1]
    if not lines:
        raise DataError(path, "no complete header line: not a responses file")
    parsed = []
    for number, line in enumerate(lines, start=1):
        try:
            obj = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(path, f"line {number} is not valid JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise DataError(path, f"line {number} is not a JSON object")
        parsed.append(obj)
    header = parsed[0]
    if header.get("kind") != "header" or header.get("format") != RESPONSES_FORMAT:
        raise DataError(
            path, f"line 1 is not a {RESPONSES_FORMAT} header (found {header.get('format')!r})"
        )
    rows = parsed[1:]
    for number, row in enumerate(rows, start=2):
        if row.get("kind") != "row" or not isinstance(row.get("id"), str):
            raise DataError(path, f"line {number} is not a response row")
    return header, rows, end


def _check_header(path: Path, found: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    for key in ("model", "defense", "params", "records"):
        if found.get(key) != expected.get(key):
            raise DataError(
                path,
                f"written for a different {key}: file has {json.dumps(found.get(key))[:300]}, "
                f"this run has {json.dumps(expected.get(key))[:300]}. Use another output path "
                "(or delete the file to start over).",
            )


def _check_rows(
    path: Path, rows: Sequence[Mapping[str, Any]], records: Sequence[Record], defense: str
) -> None:
    """Existing rows must be records ``0..k-1`` in order (what this writer produces)."""
    position = {record.id: index for index, record in enumerate(records)}
    seen: set[str] = set()
    for number, row in enumerate(rows, start=2):
        item = row["id"]
        if item not in position:
            raise DataError(path, f"line {number}: row for unknown record id", item=item)
        if item in seen:
            raise DataError(path, f"line {number}: duplicate row", item=item)
        seen.add(item)
        if row.get("index") != number - 2 or position[item] != number - 2:
            raise DataError(
                path,
                f"line {number}: row out of order (record {position[item]}, index "
                f"{row.get('index')!r}, expected record {number - 2})",
                item=item,
            )
        if row.get("defense") != defense:
            raise DataError(
                path,
                f"line {number}: defense {row.get('defense')!r}, expected {defense!r}",
                item=item,
            )


def _open_for_append(
    path: Path, header: Mapping[str, Any], records: Sequence[Record], defense: Defense
) -> int:
    """Create the file with its header, or validate it and cut a torn tail; rows already done."""
    if not path.exists():
        atomic_write_text(path, _dump(header).decode("utf-8"))
        return 0
    found, rows, end = read_responses(path, drop_torn_tail=True)
    _check_header(path, found, header)
    _check_rows(path, rows, records, defense.name)
    if end < path.stat().st_size:
        os.truncate(path, end)  # drop the torn last line of a crashed run
    return len(rows)


def generate_responses(
    adapter: VLMAdapter,
    records: Sequence[Record],
    defense: Defense,
    out_path: str | Path,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    system_prompt: str | None = None,
    query_override: str | None = None,
    blank_image: bool = False,
    vector: Any = None,
    layer: int | None = None,
    progress: bool = True,
    on_batch: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Greedy responses of ``adapter`` to ``records`` under ``defense``, one JSON line each.

    ``out_path`` is a JSON-lines file: a header (model info, defense, parameters, record ids
    digest) then one row per record (id, label, source, category, judging, defense, response,
    projection) in record order, appended and fsynced per batch. If the file exists it is
    validated (a different model / defense / parameters / record list, a row for an unknown
    id, a duplicate or out-of-order row raise :class:`DataError` naming it; a torn last line
    is dropped) and generation continues with the missing records, re-running the batch they
    belong to with its original composition so the result is byte-identical to an
    uninterrupted run. With ``vector`` (a :class:`~davsp_lib.method.vectors.HarmfulnessVector`),
    each row also gets the projection at ``layer`` (default: the vector's chosen layer).
    ``on_batch`` is called with the rows of each batch after they are on disk. A defense with a
    ``rewrite`` rewrites each batch's records before their inputs are built; the rows describe the
    original records. Returns all rows.
    """
    records = list(records)
    if not records:
        raise ValueError("no records to generate for")
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate record ids")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise ValueError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    chunks = batch_ranges(records, batch_size, blank_image)
    projection = None
    if vector is not None:
        if layer is None:
            layer = int(vector.metadata["diagnostics"]["chosen_layer"])
        direction = vector.direction(layer).contiguous().cpu().numpy().tobytes()
        projection = {
            "layer": int(layer),
            "direction_sha256": hashlib.sha256(direction).hexdigest(),
        }
    params = {
        "decoding": "greedy",
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "system_prompt": system_prompt,
        "query_override": query_override,
        "blank_image": blank_image,
        "projection": projection,
    }
    path = Path(out_path)
    header = response_header(adapter, records, defense, params)
    done = _open_for_append(path, header, records, defense)
    todo = [chunk for chunk in chunks if chunk.stop > done]
    bar = tqdm(
        total=len(records),
        initial=done,
        desc=f"generate [{defense.name}]",
        unit="rec",
        disable=not progress,
    )
    with bar, path.open("ab") as handle:
        for chunk in todo:
            # the rewritten queries go to the model; rows keep the original records
            selected = defense.rewritten([records[i] for i in chunk])
            ((_, images, conversations),) = defended_batches(
                adapter,
                selected,
                defense,
                len(selected),
                system_prompt=system_prompt,
                query_override=query_override,
                blank_image=blank_image,
            )
            scores: list[float | None] = [None] * len(selected)
            if vector is not None:
                blocks = adapter.language_layers
                with capture_hidden(blocks, [layer], first_forward_only=True) as store:
                    texts = adapter.generate(images, conversations, max_new_tokens=max_new_tokens)
                state = store[layer].detach().cpu()
                scores = [float(s) for s in vector.project(state, layer).tolist()]
            else:
                texts = adapter.generate(images, conversations, max_new_tokens=max_new_tokens)
            rows = [
                _row(records[i], i, defense, text, score)
                for i, text, score in zip(chunk, texts, scores, strict=True)
                if i >= done
            ]
            handle.write(b"".join(_dump(row) for row in rows))
            handle.flush()
            os.fsync(handle.fileno())
            bar.update(len(rows))
            if on_batch is not None:
                on_batch(rows)
    _, rows, _ = read_responses(path)
    return rows


def load_responses(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A finished (or partial, but not torn) responses file: ``(header, rows)``."""
    header, rows, _ = read_responses(path)
    return header, rows


# ------------------------------------------------------------------------------ data helpers


def stratified_sample(
    records: Sequence[Record],
    n: int,
    *,
    seed: int = 0,
    key: Callable[[Record], Any] = lambda r: r.category,
) -> list[Record]:
    """``n`` records spread evenly over ``key`` strata (round robin over shuffled strata),
    seeded; returned in input order. ``n >= len(records)`` gives all of them."""
    records = list(records)
    if n >= len(records):
        return records
    rng = random.Random(seed)
    strata: dict[Any, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        strata[key(record)].append(index)
    queues = [
        rng.sample(members, len(members))
        for _, members in sorted(strata.items(), key=lambda kv: str(kv[0]))
    ]
    rng.shuffle(queues)
    chosen: list[int] = []
    while len(chosen) < n:
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(queue.pop())
    return [records[i] for i in sorted(chosen)]


#: metadata keys under which artifacts list the record ids they were made from
#: (``vectors.fit_vector``: ``data_ids``; ``training``: ``data.ids``)
ID_KEYS = frozenset({"data_ids", "ids"})


def artifact_ids(metadata: Mapping[str, Any]) -> set[str]:
    """Every record id listed under an :data:`ID_KEYS` key anywhere in an artifact's metadata
    (a list, or a dict of lists), e.g. the records a safety prompt was trained on."""
    found: set[str] = set()

    def walk(obj: Any, listed: bool) -> None:
        if isinstance(obj, Mapping):
            for key, value in obj.items():
                walk(value, listed or key in ID_KEYS)
        elif isinstance(obj, list | tuple):
            for value in obj:
                walk(value, listed)
        elif listed and isinstance(obj, str):
            found.add(obj)

    walk(metadata, False)
    return found


def exclude_used(records: Sequence[Record], used: set[str]) -> tuple[list[Record], list[str]]:
    """Drop records whose id, group or source record (``meta["rendered_from"]``) is in
    ``used`` (evaluation must not reuse training data); returns ``(kept, dropped ids)``."""
    kept, dropped = [], []
    for record in records:
        keys = {record.id, record.group_key, str(record.meta.get("rendered_from", ""))}
        (dropped.append(record.id) if keys & used else kept.append(record))
    return kept, dropped

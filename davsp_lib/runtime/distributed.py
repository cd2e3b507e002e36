"""Sharded extraction and evaluation over processes started by ``torchrun`` or ``accelerate``.

The engine is ``torch.distributed``; this module only decides who does what and how results
come back in record order.

- :func:`dist_context` reads the launcher's environment (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``) and joins the process group; without a launcher it is a no-op single process,
  so every function here also runs as a plain script.
- **Work unit = one batch of the single-process run.** :func:`batch_spans` cuts the records
  exactly as :func:`davsp_lib.models.inputs.iter_batches` does for one process, and batch ``i`` goes
  to rank ``i % world_size`` (strided: sorted or grouped data spreads evenly over ranks). Every
  batch therefore has the same members and the same left padding whatever the number of processes,
  so the numbers do not depend on it (up to the kernels: same hardware and thread count per process
  gives bit-identical results).
- **Gather through files** in a work folder shared by the ranks (one node, or a shared file
  system): one file per batch (safetensors for activations, JSONL for responses or any rows),
  written atomically, beside a ``plan.json`` naming the records, batches and settings. A
  barrier, then rank 0 merges in record order. A batch is done when its file exists, whichever
  rank wrote it, so an interrupted run resumes with any number of processes and redoes only the
  missing batches (:func:`sharded_responses` also resumes inside an interrupted batch).
- API: :func:`sharded_extract` (activations, then fit the vector on rank 0),
  :func:`sharded_responses` (:func:`davsp_lib.evaluation.generation.generate_responses`),
  :func:`sharded_rows` (any per-record function returning JSON rows); :func:`run_batches` is
  the engine under all three.
- Collectives are barriers only (no tensors travel through them), so the process group uses
  ``gloo`` on CPU and GPU nodes alike unless ``$DAVSP_DIST_BACKEND`` says otherwise. If a rank
  fails, the launcher stops the others.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from davsp_lib.data.records import Record
from davsp_lib.method.vectors import Activations, extract
from davsp_lib.models.adapters.base import VLMAdapter
from davsp_lib.models.conversation import Placement
from davsp_lib.models.inputs import batch_ranges
from davsp_lib.runtime.errors import DataError
from davsp_lib.runtime.io import (
    atomic_open,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_json,
)

PLAN_FORMAT = "davsp-sharded-work/1"
BATCH_FORMAT = "davsp-extraction-batch/1"
#: barrier timeout: ranks that finish early wait for the slowest one this long
DEFAULT_TIMEOUT_S = 6 * 3600

Span = tuple[int, int]


# ------------------------------------------------------------------------------ processes


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world of size {self.world_size}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def device(self) -> str:
        """``cuda:<local_rank>`` where CUDA is available, else ``cpu``."""
        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"

    def describe(self) -> str:
        return f"rank {self.rank}/{self.world_size}"


def launch_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every sharded script takes: model, dtype, GPUs per process, data root."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--model", default="tiny", help="tiny/small, a LLaVA-1.5 / Qwen2-VL id or folder"
    )
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"]
    )
    parser.add_argument("--gpus-per-process", type=int, default=1, help=">1: split each model")
    parser.add_argument("--max-memory-per-gpu", help="e.g. 70GiB (with --gpus-per-process)")
    parser.add_argument("--data-root", default="", help="benchmark mirror (default: the usual)")
    parser.add_argument("--timing-json", help="write wall times here (rank 0)")
    parser.add_argument("--progress", action="store_true")
    return parser


def load_from_args(args: argparse.Namespace, ctx: DistContext) -> VLMAdapter:
    """:func:`load_for_rank` with the model options of :func:`launch_parser`."""
    return load_for_rank(
        args.model,
        ctx,
        dtype=args.dtype,
        gpus_per_process=args.gpus_per_process,
        max_memory_per_gpu=args.max_memory_per_gpu,
    )


def common_start(ctx: DistContext) -> float:
    """``time.perf_counter()`` once every rank is here (a timed step starts together)."""
    ctx.barrier()
    return time.perf_counter()


def run_timing(
    ctx: DistContext,
    n_records: int,
    *,
    start: float,
    loaded: float,
    begin: float,
    done: float,
    step: str,
    **extra: Any,
) -> dict[str, Any]:
    """A sharded script's wall times (``time.perf_counter`` marks): ``load_s`` from ``start``
    to ``loaded``, ``<step>_s`` from ``begin`` to ``done``, ``total_s`` from ``start`` to now."""
    return {
        "world_size": ctx.world_size,
        "records": n_records,
        **extra,
        "load_s": round(loaded - start, 3),
        f"{step}_s": round(done - begin, 3),
        "total_s": round(time.perf_counter() - start, 3),
    }


def write_timing(path: str | Path | None, timing: dict[str, Any]) -> None:
    """``--timing-json``: the timing as indented JSON (nothing without a path)."""
    if path:
        Path(path).write_text(json.dumps(timing, indent=2) + "\n")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"${name} must be an integer, got {value!r}") from None


def dist_context(
    *, backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
) -> DistContext:
    """This process's rank from the launcher's environment; joins the process group if needed.

    ``WORLD_SIZE`` unset or 1: a single process, nothing initialised. A process group already
    set up (e.g. by ``accelerate.PartialState``) is reused as it is. The backend defaults to
    ``$DAVSP_DIST_BACKEND``, else ``gloo`` (only barriers pass through it).
    """
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    ctx = DistContext(rank=rank, world_size=world, local_rank=local_rank)
    if ctx.distributed:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(
                backend=backend or os.environ.get("DAVSP_DIST_BACKEND") or "gloo",
                timeout=timedelta(seconds=timeout_s),
            )
        if (dist.get_rank(), dist.get_world_size()) != (ctx.rank, ctx.world_size):
            raise RuntimeError(
                f"process group is rank {dist.get_rank()}/{dist.get_world_size()}, the "
                f"environment says {ctx.describe()}"
            )
    return ctx


def shutdown(ctx: DistContext) -> None:
    """Leave the process group after a last barrier (call once, at the end of a script)."""
    if ctx.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


# ------------------------------------------------------------------------------ sharding


def batch_spans(records: Sequence[Record], batch_size: int, *, blank_image: bool) -> list[Span]:
    """``[start, end)`` of every batch a single process makes of ``records``.

    The same cut as :func:`davsp_lib.models.inputs.iter_batches`: at most ``batch_size`` records,
    and (without ``blank_image``) a new batch wherever records switch between having an image and
    not.
    """
    return [(batch.start, batch.stop) for batch in batch_ranges(records, batch_size, blank_image)]


def shard(n_items: int, rank: int, world_size: int) -> list[int]:
    """Indices ``i`` of ``range(n_items)`` that belong to ``rank``: ``i % world_size == rank``.

    Strided, so neighbouring items (often alike in length or source) spread over all ranks;
    the union over ranks is every index exactly once.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    return list(range(rank, n_items, world_size))


def _check_unique_ids(records: Sequence[Record]) -> None:
    repeated = [i for i, n in Counter(r.id for r in records).items() if n > 1]
    if repeated:
        raise ValueError(f"record ids must be unique to gather by id; repeated: {repeated[:5]}")


# ------------------------------------------------------------------------------ batch files

#: runs one batch and leaves its complete result at the given path (written atomically)
BatchRunner = Callable[[list[Record], Path], None]


def batch_file(work_dir: str | Path, index: int, suffix: str) -> Path:
    return Path(work_dir) / f"batch-{index:06d}{suffix}"


def make_plan(
    records: Sequence[Record], batch_size: int, blank_image: bool, fingerprint: dict[str, Any]
) -> dict[str, Any]:
    """What a work folder's batch files are made of: record ids, batches, and ``fingerprint``
    (model, prompts, options: whatever changes the results), JSON-normalised."""
    return json.loads(
        json.dumps(
            {
                "format": PLAN_FORMAT,
                "fingerprint": fingerprint,
                "ids": [r.id for r in records],
                "spans": batch_spans(records, batch_size, blank_image=blank_image),
            },
            default=str,
        )
    )


def write_or_check_plan(work_dir: str | Path, plan: dict[str, Any]) -> None:
    """Create ``work_dir/plan.json``, or refuse a folder made for other records or options."""
    path = Path(work_dir) / "plan.json"
    if not path.exists():
        atomic_write_json(path, plan)
        return
    saved = read_json(path)
    if saved != plan:
        keys = sorted(k for k in set(plan) | set(saved) if plan.get(k) != saved.get(k))
        if "fingerprint" in keys and isinstance(saved.get("fingerprint"), dict):
            fp, old = plan["fingerprint"], saved["fingerprint"]
            keys += [
                f"fingerprint.{k}" for k in sorted(set(fp) | set(old)) if fp.get(k) != old.get(k)
            ]
        raise DataError(
            path,
            f"this work folder holds batches of a different run (differs in {keys}); use "
            "another work folder or delete this one",
        )


def run_shard(
    records: Sequence[Record],
    spans: Sequence[Span],
    run: BatchRunner,
    work_dir: str | Path,
    suffix: str,
    *,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> list[int]:
    """One rank's part (no collectives): run its batches whose file is missing; returns them.

    Done means the batch file exists, whichever rank or run wrote it.
    """
    todo = [
        i
        for i in shard(len(spans), rank, world_size)
        if not batch_file(work_dir, i, suffix).exists()
    ]
    for i in tqdm(todo, desc=f"rank {rank}", unit="batch", disable=not progress):
        start, end = spans[i]
        run(list(records[start:end]), batch_file(work_dir, i, suffix))
    return todo


def run_batches(
    records: Sequence[Record],
    run: BatchRunner,
    work_dir: str | Path,
    *,
    suffix: str,
    fingerprint: dict[str, Any],
    ctx: DistContext,
    batch_size: int,
    blank_image: bool,
    progress: bool = False,
) -> list[Span]:
    """Every rank runs its share of the single-process batches; returns after all are done.

    Rank 0 writes (or checks) the plan first; every rank checks it, so a work folder left by a
    run with other records, batch size or ``fingerprint`` is refused on all ranks.
    """
    _check_unique_ids(records)
    plan = make_plan(records, batch_size, blank_image, fingerprint)
    if ctx.is_main:
        write_or_check_plan(work_dir, plan)
    ctx.barrier()
    write_or_check_plan(work_dir, plan)
    spans = [(int(a), int(b)) for a, b in plan["spans"]]
    run_shard(
        records,
        spans,
        run,
        work_dir,
        suffix,
        rank=ctx.rank,
        world_size=ctx.world_size,
        progress=progress,
    )
    ctx.barrier()
    return spans


def _missing_batches(work_dir: Path, n_batches: int, suffix: str) -> None:
    missing = [i for i in range(n_batches) if not batch_file(work_dir, i, suffix).exists()]
    if missing:
        raise DataError(
            work_dir,
            f"{len(missing)} of {n_batches} batches missing (first: "
            f"{batch_file(work_dir, missing[0], suffix).name}); rerun to finish them",
        )


def default_work_dir(out_path: str | Path, tag: str = "shards") -> Path:
    """``<out_path>.<tag>`` beside the output."""
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.name}.{tag}")


# ------------------------------------------------------------------------------ extraction


def save_activations(path: Path, acts: Activations) -> None:
    from safetensors.torch import save

    # one metadata key: safetensors writes several keys in a random order (different bytes)
    header = {
        "format": BATCH_FORMAT,
        "ids": acts.ids,
        "labels": acts.labels.tolist(),
        "layers": acts.layers,
        "meta": acts.meta,
    }
    data = save({"states": acts.states.contiguous()}, metadata={"davsp": json.dumps(header)})
    atomic_write_bytes(path, data)


def load_activations(path: Path, expected_ids: Sequence[str]) -> Activations:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = json.loads((handle.metadata() or {}).get("davsp", "{}"))
            states = handle.get_tensor("states")
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise DataError(path, f"not a readable batch file ({exc}); delete it to redo") from None
    if metadata.get("format") != BATCH_FORMAT:
        raise DataError(path, f"not an extraction batch (format {metadata.get('format')!r})")
    ids = metadata["ids"]
    if ids != list(expected_ids):
        raise DataError(path, f"holds records {ids[:2]}..., the plan says {expected_ids[:2]}...")
    return Activations(
        ids=ids,
        labels=np.array(metadata["labels"], dtype=bool),
        layers=metadata["layers"],
        states=states,
        meta=metadata["meta"],
    )


def merge_extraction(work_dir: str | Path) -> Activations:
    """The activations of a finished extraction work folder, in record order."""
    work_dir = Path(work_dir)
    plan = read_json(work_dir / "plan.json")
    spans = plan["spans"]
    _missing_batches(work_dir, len(spans), ".safetensors")
    parts = [
        load_activations(batch_file(work_dir, i, ".safetensors"), plan["ids"][start:end])
        for i, (start, end) in enumerate(spans)
    ]
    return Activations(
        ids=[i for part in parts for i in part.ids],
        labels=np.concatenate([part.labels for part in parts]),
        layers=parts[0].layers,
        states=torch.cat([part.states for part in parts]),
        meta=parts[0].meta,
    )


def sharded_extract(
    adapter: VLMAdapter,
    records: Iterable[Record],
    layers: Sequence[int] | None = None,
    *,
    work_dir: str | Path,
    ctx: DistContext | None = None,
    batch_size: int = 8,
    safety_prompt: str | None = None,
    placement: Placement = "prefix",
    system_prompt: str | None = None,
    query_override: str | None = None,
    blank_image: bool = False,
    progress: bool = False,
) -> Activations | None:
    """:func:`davsp_lib.method.vectors.extract` split over the ranks; the merged result on rank 0.

    Every rank calls this with the same records and options. Each runs its batches and saves
    them in ``work_dir`` (one safetensors file per batch); after a barrier rank 0 returns what a
    single-process ``extract(..., batch_size=batch_size)`` returns, the other ranks None. A
    rerun after an interruption redoes only missing batches; a work folder made for other
    records, layers, prompts or another model is refused.
    """
    ctx = ctx or dist_context()
    records = list(records)
    if not records:
        raise ValueError("no records to extract")
    chosen = list(range(adapter.num_layers + 1)) if layers is None else [int(x) for x in layers]
    options = {
        "safety_prompt": safety_prompt,
        "placement": placement,
        "system_prompt": system_prompt,
        "query_override": query_override,
        "blank_image": blank_image,
    }

    def run(batch: list[Record], path: Path) -> None:
        acts = extract(adapter, batch, chosen, batch_size=len(batch), progress=False, **options)
        save_activations(path, acts)

    fingerprint = {"task": "extract", "model": adapter.info(), "layers": chosen, **options}
    run_batches(
        records,
        run,
        work_dir,
        suffix=".safetensors",
        fingerprint=fingerprint,
        ctx=ctx,
        batch_size=batch_size,
        blank_image=blank_image,
        progress=progress,
    )
    return merge_extraction(work_dir) if ctx.is_main else None


# ------------------------------------------------------------------------------ JSON rows


def _dump_line(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


def merge_rows(work_dir: str | Path, out_path: str | Path) -> Path:
    """Concatenate the JSONL batch files of a finished work folder into ``out_path``."""
    work_dir = Path(work_dir)
    plan = read_json(work_dir / "plan.json")
    _missing_batches(work_dir, len(plan["spans"]), ".jsonl")
    with atomic_open(out_path, "w", encoding="utf-8") as handle:
        for i, (start, end) in enumerate(plan["spans"]):
            path = batch_file(work_dir, i, ".jsonl")
            lines = path.read_text(encoding="utf-8").splitlines()
            ids = [json.loads(line).get("id") for line in lines]
            if ids != plan["ids"][start:end]:
                raise DataError(
                    path,
                    f"rows for {ids[:2]}..., the plan says {plan['ids'][start : start + 2]}...",
                )
            handle.write("".join(line + "\n" for line in lines))
    return Path(out_path)


def sharded_rows(
    records: Iterable[Record],
    process: Callable[[list[Record]], list[dict[str, Any]]],
    out_path: str | Path,
    *,
    fingerprint: dict[str, Any],
    ctx: DistContext | None = None,
    batch_size: int = 8,
    blank_image: bool = False,
    work_dir: str | Path | None = None,
    progress: bool = False,
) -> Path | None:
    """Any per-record computation, one JSON row per record, over the ranks; merged on rank 0.

    ``process(batch)`` gets the single-process batches (:func:`batch_spans`) and returns one
    JSON-safe dict per record, in order, each with the record's ``"id"``. Each batch's rows are
    saved atomically in ``work_dir`` (default ``<out_path>.parts``); rank 0 then writes
    ``out_path`` in record order and returns it. ``fingerprint`` names whatever changes the
    rows (model, prompts, ...): a work folder made with another is refused.
    """
    ctx = ctx or dist_context()
    records = list(records)
    if not records:
        raise ValueError("no records")
    work_dir = Path(work_dir) if work_dir is not None else default_work_dir(out_path, "parts")

    def run(batch: list[Record], path: Path) -> None:
        rows = process(batch)
        if not isinstance(rows, list) or [
            row.get("id") if isinstance(row, dict) else None for row in rows
        ] != [r.id for r in batch]:
            raise ValueError("process(batch) must return one dict per record, in order, with 'id'")
        atomic_write_text(path, "".join(_dump_line(row) for row in rows))

    run_batches(
        records,
        run,
        work_dir,
        suffix=".jsonl",
        fingerprint={"task": "rows", **fingerprint},
        ctx=ctx,
        batch_size=batch_size,
        blank_image=blank_image,
        progress=progress,
    )
    result = merge_rows(work_dir, out_path) if ctx.is_main else None
    ctx.barrier()  # nobody returns before the merged file exists
    return result


# ------------------------------------------------------------------------------ responses


def _vector_digest(vector: Any) -> str | None:
    if vector is None:
        return None
    digest = hashlib.sha256()
    for name, tensor in sorted(vector.tensors().items()):
        digest.update(name.encode())
        digest.update(tensor.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def merge_responses(
    work_dir: str | Path, records: Sequence[Record], out_path: str | Path, batch_size: int
) -> Path:
    """One responses file (:mod:`davsp_lib.evaluation.generation` format) from the per-batch files.

    Each batch file is a complete responses file for its batch alone; the merged header is
    theirs with the whole record list and the real batch size, and rows get their index in the
    whole list: the bytes ``generate_responses`` writes for the same records in one process.
    """
    from davsp_lib.evaluation.generation import read_responses, records_digest

    work_dir = Path(work_dir)
    plan = read_json(work_dir / "plan.json")
    spans = plan["spans"]
    _missing_batches(work_dir, len(spans), ".jsonl")
    header: dict[str, Any] | None = None
    lines = []
    for i, (start, end) in enumerate(spans):
        path = batch_file(work_dir, i, ".jsonl")
        found, rows, _ = read_responses(path)
        same = {k: v for k, v in found.items() if k not in ("params", "records")}
        params = {k: v for k, v in found["params"].items() if k != "batch_size"}
        if header is None:
            header, first = found, (same, params)
        elif (same, params) != first:
            raise DataError(path, f"header differs from {batch_file(work_dir, 0, '.jsonl').name}")
        if [row["id"] for row in rows] != [r.id for r in records[start:end]]:
            raise DataError(path, f"rows are not records {start}..{end - 1} of the plan")
        for offset, row in enumerate(rows):
            row["index"] = start + offset
            lines.append(_dump_line(row))
    assert header is not None
    header["params"]["batch_size"] = batch_size
    header["records"] = {"n": len(records), "ids_sha256": records_digest(records)}
    with atomic_open(out_path, "w", encoding="utf-8") as handle:
        handle.write(_dump_line(header) + "".join(lines))
    return Path(out_path)


def sharded_responses(
    adapter: VLMAdapter,
    records: Iterable[Record],
    defense: Any,
    out_path: str | Path,
    *,
    ctx: DistContext | None = None,
    batch_size: int = 8,
    work_dir: str | Path | None = None,
    progress: bool = False,
    **generate_kwargs: Any,
) -> list[dict[str, Any]] | None:
    """:func:`davsp_lib.evaluation.generation.generate_responses` split over the ranks.

    Each batch of the single-process run is generated by one rank into its own responses file
    (``work_dir``, default ``<out_path>.parts``; an interrupted batch resumes inside that file,
    a finished one is renamed into place). Rank 0 merges them into ``out_path`` and returns
    the rows, after ``generate_responses`` itself has validated the merged file (same header,
    rows in order, nothing left to generate). ``generate_kwargs``: ``max_new_tokens``,
    ``system_prompt``, ``query_override``, ``blank_image``, ``vector``, ``layer``.
    """
    from davsp_lib.evaluation.generation import generate_responses

    ctx = ctx or dist_context()
    records = list(records)
    if not records:
        raise ValueError("no records to generate for")
    if "on_batch" in generate_kwargs:
        raise ValueError("on_batch is not supported across processes")
    work_dir = Path(work_dir) if work_dir is not None else default_work_dir(out_path, "parts")
    blank_image = bool(generate_kwargs.get("blank_image", False))

    def run(batch: list[Record], path: Path) -> None:
        partial = path.with_name(path.name + ".partial")
        generate_responses(
            adapter, batch, defense, partial, batch_size=len(batch), progress=False,
            **generate_kwargs,
        )  # fmt: skip
        os.replace(partial, path)

    options = {k: v for k, v in generate_kwargs.items() if k != "vector"}
    fingerprint = {
        "task": "responses",
        "model": adapter.info(),
        "defense": defense.describe(),
        "vector_sha256": _vector_digest(generate_kwargs.get("vector")),
        **options,
    }
    run_batches(
        records,
        run,
        work_dir,
        suffix=".jsonl",
        fingerprint=fingerprint,
        ctx=ctx,
        batch_size=batch_size,
        blank_image=blank_image,
        progress=progress,
    )
    rows = None
    if ctx.is_main:
        merge_responses(work_dir, records, out_path, batch_size)
        # generate_responses validates header and rows and, all rows being there, runs nothing
        rows = generate_responses(
            adapter, records, defense, out_path, batch_size=batch_size, progress=False,
            **generate_kwargs,
        )  # fmt: skip
    ctx.barrier()
    return rows


# ------------------------------------------------------------------------------ devices


def device_map_for(
    ctx: DistContext,
    *,
    gpus_per_process: int = 1,
    max_memory_per_gpu: str | None = None,
    cpu_memory: str | None = None,
    gpu_count: int | None = None,
) -> dict[str, Any]:
    """``load_adapter`` keyword arguments placing this rank's model on its own GPU(s).

    One GPU per process: ``{"device_map": "cuda:<local_rank>"}``. A model too big for one GPU:
    ``gpus_per_process = g`` gives local rank ``r`` the GPUs ``r*g .. r*g+g-1`` through
    ``device_map="auto"`` and a ``max_memory`` that lists only those (default: 90% of each;
    ``cpu_memory`` also allows CPU offload). A process that sees exactly ``gpus_per_process``
    GPUs uses those. Without CUDA: the CPU. ``max_memory`` needs a
    ``load_adapter`` that passes it on to ``from_pretrained``.
    """
    if gpus_per_process < 1:
        raise ValueError(f"gpus_per_process must be >= 1, got {gpus_per_process}")
    count = torch.cuda.device_count() if gpu_count is None else gpu_count
    if count == 0:
        return {"device_map": "cpu"}
    # a process that sees exactly its own GPUs (CUDA_VISIBLE_DEVICES set per process) uses them
    first = 0 if count == gpus_per_process else ctx.local_rank * gpus_per_process
    mine = list(range(first, first + gpus_per_process))
    if mine[-1] >= count:
        raise ValueError(
            f"local rank {ctx.local_rank} with {gpus_per_process} GPU(s) each needs GPUs {mine}, "
            f"this node has {count}: launch at most {count // gpus_per_process} processes per node"
        )
    if gpus_per_process == 1 and max_memory_per_gpu is None:
        return {"device_map": f"cuda:{first}"}
    # only this rank's GPUs (and the CPU when allowed) are listed, so "auto" uses nothing else
    memory: dict[int | str, int | str] = {
        gpu: max_memory_per_gpu or int(0.9 * torch.cuda.get_device_properties(gpu).total_memory)
        for gpu in mine
    }
    if cpu_memory:
        memory["cpu"] = cpu_memory
    return {"device_map": "auto", "max_memory": memory}


def load_for_rank(
    name_or_path: str | Path,
    ctx: DistContext,
    *,
    dtype: str = "auto",
    gpus_per_process: int = 1,
    max_memory_per_gpu: str | None = None,
    cpu_memory: str | None = None,
) -> VLMAdapter:
    """``load_adapter`` with this rank's placement (:func:`device_map_for`)."""
    import inspect

    from davsp_lib.models.adapters import load_adapter

    placement = device_map_for(
        ctx,
        gpus_per_process=gpus_per_process,
        max_memory_per_gpu=max_memory_per_gpu,
        cpu_memory=cpu_memory,
    )
    if "max_memory" in placement and "max_memory" not in inspect.signature(load_adapter).parameters:
        raise NotImplementedError(
            "splitting a model over several GPUs needs load_adapter(..., max_memory=...), which "
            "this version of davsp_lib.models.adapters.registry does not accept yet"
        )
    return load_adapter(name_or_path, dtype=dtype, **placement)

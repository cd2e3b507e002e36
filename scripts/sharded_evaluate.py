"""Generate responses under a defense over N processes (``generation.generate_responses``).

    # one process (no launcher needed)
    .venv/bin/python scripts/sharded_evaluate.py --model tiny --defense none --out runs/ev/r.jsonl
    # N processes on one node (GPUs: one per process; CPU: gloo)
    .venv/bin/torchrun --nproc_per_node N scripts/sharded_evaluate.py --model ... --out ...
    .venv/bin/accelerate launch --multi_gpu --num_processes N scripts/sharded_evaluate.py ...

Records: ``--data`` is ``builtin-figstep`` / ``builtin-typo`` / ``builtin-text`` (the project's
own instructions), ``figstep`` (SafeBench), ``mmsafetybench`` (TYPO) or ``mmvet`` from the data
mirror; ``--limit`` keeps a seeded, category-stratified sample. ``--defense`` is one of
``generation.DEFENSES`` (trained ones read ``--training-dir``); ``--vector`` adds each input's
projection on the harmfulness vector.

The batches are those of a single-process run (``--batch-size``), spread over the ranks; each is
saved under ``<out>.parts`` as it finishes, so a rerun with any number of processes does only
what is missing. Rank 0 writes ``--out``: the same bytes ``generate_responses`` writes in one
process (given the same hardware and threads per process). ``--timing-json``: wall times.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from davsp_lib.data.records import Record
from davsp_lib.runtime import distributed

DATA = ("builtin-figstep", "builtin-typo", "builtin-text", "figstep", "mmsafetybench", "mmvet")


def _parser() -> argparse.ArgumentParser:
    parser = distributed.launch_parser(__doc__.splitlines()[0])
    parser.add_argument("--data", choices=DATA, default="builtin-figstep")
    parser.add_argument("--limit", type=int, default=0, help="0: all records")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--defense", default="none")
    parser.add_argument("--training-dir", default="", help="trained defenses (<variant>.*)")
    parser.add_argument("--vector", default="", help="harmfulness vector: add projections")
    parser.add_argument("--layer", type=int, default=-1, help="projection layer (-1: chosen)")
    parser.add_argument("--blank-image", action="store_true", help="text records: white image")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", required=True, help="responses file (JSON lines)")
    return parser


def _records(name: str, root: str | None, limit: int, seed: int) -> list[Record]:
    from davsp_lib.data import datasets
    from davsp_lib.evaluation.generation import stratified_sample

    if name.startswith("builtin-"):
        data = datasets.load_builtin(name.removeprefix("builtin-"))
    elif name == "figstep":
        data = datasets.load_figstep(root)
    elif name == "mmsafetybench":
        data = datasets.load_mmsafetybench(root, variant="typo")
    else:
        data = datasets.load_mmvet(root)
    records = list(data)
    return stratified_sample(records, limit, seed=seed) if limit > 0 else records


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    ctx = distributed.dist_context()
    from davsp_lib.evaluation.generation import make_defense
    from davsp_lib.method.vectors import HarmfulnessVector

    root = args.data_root or None
    records = _records(args.data, root, args.limit, args.seed)
    adapter = distributed.load_from_args(args, ctx)
    defense = make_defense(
        args.defense, training_dir=args.training_dir or None, adapter=adapter, root=root
    )
    vector = HarmfulnessVector.load(args.vector, adapter) if args.vector else None
    loaded = time.perf_counter()
    begin = distributed.common_start(ctx)
    rows = distributed.sharded_responses(
        adapter,
        records,
        defense,
        args.out,
        ctx=ctx,
        batch_size=args.batch_size,
        progress=args.progress,
        max_new_tokens=args.max_new_tokens,
        blank_image=args.blank_image,
        vector=vector,
        layer=None if args.layer < 0 else args.layer,
    )
    generated = time.perf_counter()
    if ctx.is_main:
        assert rows is not None
        timing = distributed.run_timing(
            ctx, len(records), start=start, loaded=loaded, begin=begin, done=generated,
            step="generate",
        )  # fmt: skip
        print(json.dumps({"responses": str(Path(args.out)), "rows": len(rows), **timing}))
        distributed.write_timing(args.timing_json, timing)
    distributed.shutdown(ctx)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

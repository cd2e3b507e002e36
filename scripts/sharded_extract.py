"""Extract activations over N processes and fit the harmfulness vector (notebook 01's vector step).

    # one process (no launcher needed)
    .venv/bin/python scripts/sharded_extract.py --model tiny --out runs/vec/vector
    # N processes on one node (GPUs: one per process; CPU: gloo)
    .venv/bin/torchrun --nproc_per_node N scripts/sharded_extract.py --model ... --out ...
    .venv/bin/accelerate launch --multi_gpu --num_processes N scripts/sharded_extract.py ...

Records: ``--data study`` is notebook 01's vector split (``diagnostics.study_data``: the
text-prompt ``harmful_train`` / ``harmless_train`` splits of the data mirror, or the built-in set
without one; ``--n-vector`` per class, ``--seed``); ``--data builtin`` the first
``--per-class`` per class of the project's built-in instructions. As in notebook 01, every
instruction is the text query over a blank white image, with the DAVSP safety prefix unless
``--no-safety-prefix``.

Batches are those of a single-process run (``--batch-size``), spread over the ranks; each batch is
saved in ``--work-dir`` (default ``<out>.shards``) as it finishes, so a rerun, with any number of
processes, does only what is missing. Rank 0 merges in record order, fits the vector and writes
``<out>.safetensors`` + ``<out>.json``: the same bytes for any number of processes (given the same
hardware and threads per process). ``--timing-json`` records wall times (rank 0).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from davsp_lib.data import prompts
from davsp_lib.data.records import Record
from davsp_lib.method import vectors
from davsp_lib.runtime import distributed
from davsp_lib.runtime.errors import DataError


def _parser() -> argparse.ArgumentParser:
    parser = distributed.launch_parser(__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["study", "builtin"], default="study")
    parser.add_argument("--no-mirror", action="store_true", help="study: built-in data only")
    parser.add_argument("--n-vector", type=int, default=48, help="study: records per class")
    parser.add_argument("--n-heldout", type=int, default=32, help="study: as in notebook 01")
    parser.add_argument("--n-gap", type=int, default=32, help="study: as in notebook 01")
    parser.add_argument("--per-class", type=int, default=16, help="builtin: records per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", default="all", help="'all' or a comma list")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-safety-prefix", action="store_true")
    parser.add_argument("--out", required=True, help="vector path (.safetensors + .json)")
    parser.add_argument("--work-dir", help="per-batch files (default: <out>.shards)")
    return parser


def _records(args: argparse.Namespace, root: Path | None) -> tuple[list[Record], str]:
    from davsp_lib.data import datasets
    from davsp_lib.method import diagnostics

    if args.data == "builtin":
        text = datasets.load_builtin("text")
        malicious = [r for r in text if r.is_malicious][: args.per_class]
        benign = [r for r in text if not r.is_malicious][: args.per_class]
        return malicious + benign, "built-in"
    # held-out sizes matter: without a mirror the built-in split takes held-out records first
    data = diagnostics.study_data(
        root, n_vector=args.n_vector, n_heldout=args.n_heldout, n_gap=args.n_gap, seed=args.seed
    )
    return data.vector, data.source


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    ctx = distributed.dist_context()
    from davsp_lib.data.datasets import data_root

    root = None
    if not args.no_mirror:
        try:
            root = data_root(args.data_root or None)
        except DataError as error:
            if ctx.is_main:
                print(f"no benchmark mirror ({error}); built-in data only")
    safety = None
    if not args.no_safety_prefix:
        try:
            safety = prompts.text("davsp_safety_prefix", root)
        except DataError as error:
            if ctx.is_main:
                print(f"no safety prefix available ({error}); prompts carry none")
    records, source = _records(args, root)
    adapter = distributed.load_from_args(args, ctx)
    layers = vectors.parse_layers(args.layers, adapter.num_layers)
    loaded = time.perf_counter()

    out = Path(args.out)
    work_dir = Path(args.work_dir) if args.work_dir else out.with_name(out.name + ".shards")
    begin = distributed.common_start(ctx)
    acts = distributed.sharded_extract(
        adapter,
        records,
        layers,
        work_dir=work_dir,
        ctx=ctx,
        batch_size=args.batch_size,
        safety_prompt=safety,
        blank_image=True,
        progress=args.progress,
    )
    extracted = time.perf_counter()
    if ctx.is_main:
        assert acts is not None
        vector = vectors.fit_vector(
            acts,
            metadata={
                "seed": args.seed,
                "data_source": source,
                "safety_prefix": safety is not None,
            },
        )
        tensor_path, json_path = vector.save(out)
        timing = distributed.run_timing(
            ctx, len(records), start=start, loaded=loaded, begin=begin, done=extracted,
            step="extract",
            batches=len(distributed.batch_spans(records, args.batch_size, blank_image=True)),
        )  # fmt: skip
        print(json.dumps({"vector": str(tensor_path), "metadata": str(json_path), **timing}))
        distributed.write_timing(args.timing_json, timing)
    distributed.shutdown(ctx)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Batched activation extraction against a per-sample loop, on the embedded default model.

    .venv/bin/python benchmarks/extraction.py [--model tiny] [--n 16] [--batch-size 8]
                                              [--layers all] [--figstep]

Both paths are ``davsp_lib.method.vectors.extract`` on the same records and layers; the baseline
uses ``batch_size=1`` (one forward per record, as the DAVSP reference scripts do). Records: the
project's built-in instructions (half harmful, half benign) as text over a blank image, with the
DAVSP safety prefix when the data root has ``prompts.json``; ``--figstep`` uses FigStep renders
instead (the OCR cache is filled by a warm-up pass first, so both timed runs measure the language
model only). Prints the seconds of each path, their ratio (one run each, same process) and the
largest absolute difference between the two sets of states.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from davsp_lib.data import prompts
from davsp_lib.data.datasets import as_image_attack, load_builtin
from davsp_lib.method.vectors import extract, parse_layers
from davsp_lib.models.adapters import load_adapter
from davsp_lib.runtime.errors import DataError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--n", type=int, default=16, help="records (half harmful, half benign)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--layers", default="all", help="'all' or a comma list")
    parser.add_argument("--figstep", action="store_true", help="FigStep images, not text")
    args = parser.parse_args()

    adapter = load_adapter(args.model)
    layers = parse_layers(args.layers, adapter.num_layers)
    text = load_builtin("text")
    half = args.n // 2
    records = [r for r in text if r.is_malicious][:half]
    records += [r for r in text if not r.is_malicious][: args.n - half]
    if args.figstep:
        records = list(as_image_attack(records, "figstep"))
    try:
        safety = prompts.text("davsp_safety_prefix")
    except DataError:
        safety = None
    common = dict(safety_prompt=safety, blank_image=True, progress=False)
    if args.figstep:  # fill the OCR cache: reading is the same work for both paths
        extract(adapter, records, [1], batch_size=args.batch_size, **common)
    else:  # warm-up (first forward allocates)
        extract(adapter, records[:2], [1], batch_size=2, **common)

    start = time.perf_counter()
    batched = extract(adapter, records, layers, batch_size=args.batch_size, **common)
    batched_s = time.perf_counter() - start
    start = time.perf_counter()
    single = extract(adapter, records, layers, batch_size=1, **common)
    single_s = time.perf_counter() - start

    diff = (batched.states - single.states).abs()
    summary = {
        "model": adapter.info()["model_id"],
        "records": len(records),
        "inputs": "FigStep images" if args.figstep else "text over a blank image",
        "safety_prefix": safety is not None,
        "layers": f"{layers[0]}..{layers[-1]} ({len(layers)})",
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "batched_s": round(batched_s, 2),
        "per_sample_s": round(single_s, 2),
        "per_sample_over_batched": round(single_s / batched_s, 2),
        "max_abs_diff": float(diff.max()),
        "max_abs_state": float(single.states.abs().max()),
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Batched greedy generation against a per-sample loop, on the embedded default model.

    .venv/bin/python benchmarks/generation.py [--model tiny] [--n 16] [--batch-size 8]
                                              [--max-new-tokens 24] [--defense davsp_prefix]

Both paths are ``davsp_lib.evaluation.generation.generate_responses`` on the same records, defense
and token budget (greedy, ``max_new_tokens`` new tokens each, written to a temporary folder); the
baseline uses ``batch_size=1`` (one ``generate`` call per record, as the DAVSP reference evaluation
scripts do). Records: the project's built-in instructions (half harmful, half benign) rendered
FigStep-style with FigStep's prompt; the OCR cache is filled by a warm-up pass first, so both timed
runs measure the language model. Prints the seconds of each path, their ratio (one run each, same
process), the records per second, and how many answers the two paths share exactly (left padding can
change greedy outputs in the last bits).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from davsp_lib.data.datasets import load_builtin
from davsp_lib.evaluation.generation import DEFENSES, generate_responses, make_defense
from davsp_lib.models.adapters import load_adapter


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--n", type=int, default=16, help="records (half harmful, half benign)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument(
        "--defense",
        default="davsp_prefix",
        choices=[n for n, s in DEFENSES.items() if s.variant is None],
    )
    args = parser.parse_args()

    adapter = load_adapter(args.model)
    data = load_builtin("figstep")
    half = args.n // 2
    records = [r for r in data if r.is_malicious][:half]
    records += [r for r in data if not r.is_malicious][: args.n - half]
    defense = make_defense(args.defense)

    with tempfile.TemporaryDirectory() as folder:

        def run(name: str, batch_size: int, items=records, tokens=args.max_new_tokens):
            start = time.perf_counter()
            rows = generate_responses(
                adapter,
                items,
                defense,
                Path(folder) / f"{name}.jsonl",
                batch_size=batch_size,
                max_new_tokens=tokens,
                progress=False,
            )
            return rows, time.perf_counter() - start

        run("warmup", args.batch_size, tokens=1)  # OCR cache filled, first forward allocated
        batched, batched_s = run("batched", args.batch_size)
        single, single_s = run("single", 1)

    same = sum(a["response"] == b["response"] for a, b in zip(batched, single, strict=True))
    summary = {
        "model": adapter.info()["model_id"],
        "records": len(records),
        "inputs": "built-in instructions as FigStep images, FigStep prompt",
        "defense": args.defense,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "batched_s": round(batched_s, 2),
        "per_sample_s": round(single_s, 2),
        "per_sample_over_batched": round(single_s / batched_s, 2),
        "batched_records_per_s": round(len(records) / batched_s, 3),
        "identical_answers": f"{same}/{len(records)}",
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

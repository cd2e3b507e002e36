"""Sharded extraction and generation: 1 process against 2 processes (torchrun, gloo).

    .venv/bin/python benchmarks/sharding.py [--model tiny] [--n 32] [--batch-size 8]
        [--layers all] [--threads 2] [--evaluate 8] [--gen-batch-size 4] [--max-new-tokens 16]
        [--skip-equal-threads]

Extraction: ``scripts/sharded_extract.py`` on ``--n`` built-in instructions (half harmful, half
benign) as text over a blank image with the DAVSP safety prefix, at ``--layers``. Generation
(``--evaluate N``, 0 to skip): ``scripts/sharded_evaluate.py`` on the first N built-in FigStep
images (stratified sample), no defense, greedy. Each runs three times, one after the other:

1. one process with ``--threads`` torch threads (the whole machine for one process);
2. ``torchrun --nproc_per_node 2``, one thread per process (the same cores, split);
3. one process with one thread (the per-rank setting of run 2: the identity reference).

Prints each run's phase wall time (from a barrier after the model load to the merged result on
rank 0) and end-to-end wall time (launcher, imports and model load included), the ratios run 1
/ run 2, and identity: vector / responses files byte for byte, and the largest absolute
difference between the merged activations. Nothing is asserted: CPU kernels may round
differently with another thread count, so only run 3 vs run 2 is expected to be bit-identical.
Every process loads its own copy of the model (about 4 GB for ``tiny``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUNS = (("1_process", 1, None), ("2_processes", 2, 1), ("1_process_1_thread", 1, 1))


def launch(script: str, out: Path, args: list[str], processes: int, threads: int) -> dict:
    timing = out.with_name(out.name + ".timing.json")
    launcher = [sys.executable]
    if processes > 1:
        launcher = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [*launcher, str(ROOT / "scripts" / f"{script}.py"), *args, "--out", str(out),
               "--timing-json", str(timing)]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result = json.loads(timing.read_text())
    phase = result.get("extract_s", result.get("generate_s"))
    return {"processes": processes, "threads_each": threads, "phase_s": phase,
            "wall_s": round(wall, 2), "load_s": result["load_s"]}  # fmt: skip


def same_bytes(a: Path, b: Path, suffixes: tuple[str, ...] = ("",)) -> bool:
    return all(Path(f"{a}{s}").read_bytes() == Path(f"{b}{s}").read_bytes() for s in suffixes)


def compare_vectors(a: Path, b: Path) -> dict:
    from davsp_lib.runtime.distributed import default_work_dir, merge_extraction

    acts_a = merge_extraction(default_work_dir(a)).states
    acts_b = merge_extraction(default_work_dir(b)).states
    return {
        "vector_files_byte_identical": same_bytes(a, b, (".safetensors", ".json")),
        "activations_bit_identical": bool((acts_a == acts_b).all()),
        "activations_max_abs_diff": float((acts_a - acts_b).abs().max()),
        "activations_max_abs": float(acts_b.abs().max()),
    }


def compare_responses(a: Path, b: Path) -> dict:
    rows_a = [json.loads(x) for x in a.read_text().splitlines()[1:]]
    rows_b = [json.loads(x) for x in b.read_text().splitlines()[1:]]
    differ = sum(x["response"] != y["response"] for x, y in zip(rows_a, rows_b, strict=True))
    return {"responses_file_byte_identical": same_bytes(a, b), "responses_differing": differ}


def study(script, args, folder, threads, skip_ref, compare) -> dict:
    runs, outs = {}, {}
    for name, processes, each in RUNS:
        if skip_ref and name == "1_process_1_thread":
            continue
        # same file name in every run: the vector's JSON records its tensor file's name
        outs[name] = folder / script / name / "out"
        outs[name].parent.mkdir(parents=True, exist_ok=True)
        runs[name] = launch(script, outs[name], args, processes, each or threads)
    one, two = runs["1_process"], runs["2_processes"]
    summary = {
        "runs": runs,
        "phase_ratio_1proc_over_2proc": round(one["phase_s"] / two["phase_s"], 2),
        "wall_ratio_1proc_over_2proc": round(one["wall_s"] / two["wall_s"], 2),
        "identity_1proc_vs_2proc": compare(outs["1_process"], outs["2_processes"]),
    }
    if "1_process_1_thread" in outs:
        summary["identity_1proc_1thread_vs_2proc"] = compare(
            outs["1_process_1_thread"], outs["2_processes"]
        )
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--n", type=int, default=32, help="extraction records (half per class)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--layers", default="all")
    parser.add_argument("--threads", type=int, default=2, help="threads of the 1-process run")
    parser.add_argument("--evaluate", type=int, default=8, help="FigStep records; 0: skip")
    parser.add_argument("--gen-batch-size", type=int, default=4, help="generation batch size")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--skip-equal-threads", action="store_true", help="skip run 3")
    args = parser.parse_args()

    summary = {"model": args.model, "cpu_count": os.cpu_count(), "batch_size": args.batch_size}
    with tempfile.TemporaryDirectory(prefix="davsp-sharding-") as tmp:
        folder = Path(tmp)
        extract_args = ["--model", args.model, "--data", "builtin", "--per-class",
                        str(args.n // 2), "--batch-size", str(args.batch_size), "--layers",
                        args.layers]  # fmt: skip
        summary["extraction"] = {
            "records": 2 * (args.n // 2),
            "layers": args.layers,
            **study(
                "sharded_extract",
                extract_args,
                folder,
                args.threads,
                args.skip_equal_threads,
                compare_vectors,
            ),
        }
        if args.evaluate > 0:
            evaluate_args = ["--model", args.model, "--data", "builtin-figstep", "--limit",
                             str(args.evaluate), "--batch-size", str(args.gen_batch_size),
                             "--max-new-tokens", str(args.max_new_tokens)]  # fmt: skip
            summary["generation"] = {
                "records": args.evaluate,
                "batch_size": args.gen_batch_size,
                "max_new_tokens": args.max_new_tokens,
                **study(
                    "sharded_evaluate",
                    evaluate_args,
                    folder,
                    args.threads,
                    args.skip_equal_threads,
                    compare_responses,
                ),
            }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

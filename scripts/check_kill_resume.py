"""Kill notebook 02 mid-training, rerun it, and compare with an uninterrupted run.

    .venv/bin/python scripts/check_kill_resume.py \
        --vector runs/<run>/01_harmfulness_vector/harmfulness_vector

Runs notebook 02 with papermill three times on the same parameters: (a) uninterrupted into
``<work>/straight``; (b) into ``<work>/killed``, killed with SIGKILL (process group: papermill and
its kernel) once the DAVSP checkpoint reaches ``--kill-at`` steps; (c) again into
``<work>/killed`` (resumes from the checkpoint). Prints whether the final borders are equal
(``torch.equal``) and whether the saved tensor files are byte-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def checkpoint_step(path: Path) -> int:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return int(json.loads(handle.metadata()["davsp"])["state"]["step"])
    except Exception:  # not there yet, or being replaced
        return -1


def papermill(out_dir: Path, params: dict, log: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "papermill", str(ROOT / "notebooks/02_vsp_training.ipynb"),
            str(out_dir / "executed.ipynb"), "--cwd", str(ROOT)]  # fmt: skip
    for key, value in {
        **params,
        "output_dir": str(out_dir),
        "figures_dir": str(out_dir / "fig"),
    }.items():
        args += ["-y", f"{key}: {json.dumps(value)}"]
    out_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vector", required=True)
    parser.add_argument("--work", default="/tmp/kill_resume")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--kill-at", type=int, default=3)
    args = parser.parse_args(argv)
    work = Path(args.work)
    params = {
        "vector_path": args.vector, "variants": ["davsp"], "steps": args.steps, "n_train": 4,
        "n_heldout": 2, "batch_size": 2, "checkpoint_every": 1, "answer_tokens": 8, "lr": 0.1,
    }  # fmt: skip
    start = time.perf_counter()
    straight = papermill(work / "straight", params, work / "straight.log")
    if straight.wait() != 0:
        print("uninterrupted run failed; see", work / "straight.log")
        return 1
    print(f"uninterrupted run: {time.perf_counter() - start:.0f} s")
    killed_dir = work / "killed"
    proc = papermill(killed_dir, params, work / "killed.log")
    checkpoint = killed_dir / "davsp" / "checkpoint.safetensors"
    while proc.poll() is None and checkpoint_step(checkpoint) < args.kill_at:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    print(
        f"killed (exit {proc.returncode}) with the checkpoint at step {checkpoint_step(checkpoint)}"
    )
    resumed = papermill(killed_dir, params, work / "resumed.log")
    if resumed.wait() != 0:
        print("resumed run failed; see", work / "resumed.log")
        return 1
    import torch

    from davsp_lib.method.vsp import VisualSafetyPrompt

    a = VisualSafetyPrompt.load(work / "straight" / "davsp")
    b = VisualSafetyPrompt.load(killed_dir / "davsp")
    info = json.loads((killed_dir / "results.json").read_text())["results"]["variants"]["davsp"]
    same_bytes = (work / "straight/davsp.safetensors").read_bytes() == (
        killed_dir / "davsp.safetensors"
    ).read_bytes()
    print(f"resumed from step {info['resumed_from']} of {info['steps']}; borders equal: "
          f"{torch.equal(a.delta, b.delta)}; tensor files byte-identical: {same_bytes}; "
          f"losses equal: {a.metadata['losses'] == b.metadata['losses']}")  # fmt: skip
    return 0 if torch.equal(a.delta, b.delta) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Run a command and report its wall time and the peak resident memory of its process tree.

The main job's memory lives in child processes (papermill starts a Jupyter kernel per notebook),
so ``ru_maxrss`` of the parent says little. This samples the summed RSS of the command and all
its descendants from ``/proc`` every ``--every`` seconds (Linux only) and prints the peak.

    python scripts/peak_rss.py -- bash scripts/run.sh --out runs/main
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def children_by_parent() -> dict[int, list[int]]:
    table: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended while we looked
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])  # the name may contain spaces
        table.setdefault(parent, []).append(int(entry.name))
    return table


def tree_rss_bytes(root: int) -> int:
    """Summed VmRSS of ``root`` and every descendant."""
    table, total, stack = children_by_parent(), 0, [root]
    while stack:
        pid = stack.pop()
        stack += table.get(pid, [])
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=float, default=1.0, help="sampling period in seconds")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command (after --)")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    if not Path("/proc/self/status").is_file():
        parser.error("needs Linux /proc")
    started = time.perf_counter()
    process = subprocess.Popen(command)
    peak = 0
    while process.poll() is None:
        peak = max(peak, tree_rss_bytes(process.pid))
        time.sleep(args.every)
    seconds = time.perf_counter() - started
    print(
        f"[peak_rss] exit {process.returncode}; wall {seconds:.1f} s; "
        f"peak RSS of the process tree {peak / 2**30:.2f} GiB (sampled every {args.every} s)",
        file=sys.stderr,
        flush=True,
    )
    return process.returncode


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

#!/usr/bin/env bash
# Does the suite pass on the newest versions pyproject.toml's ranges allow? (Not part of the
# default suite.) Builds a scratch venv WITHOUT the lock, prints every version that differs from
# requirements/lock.txt, then runs ruff and pytest there; the exit status is the suite's.
#   bash scripts/upgrade_check.sh [PYTEST ARGS]      e.g. tests/test_intervention.py
# When green, bump the lock with `bash scripts/lock.sh` and commit it. Run it before bumping the
# lock, when a new transformers / torch release lands, and monthly: a red run names the tests
# (and so the package) that broke, before a user meets it on a fresh install.
set -euo pipefail
cd "$(dirname "$0")/.."
SCRATCH="${UPGRADE_VENV:-${TMPDIR:-/tmp}/davsp-upgrade-venv}"
rm -rf "$SCRATCH"
VENV="$SCRATCH" DAVSP_UNLOCKED=1 bash scripts/install.sh tiny,dev
echo "[upgrade] versions that differ from requirements/lock.txt (locked -> newest):"
"$SCRATCH/bin/python" -m pip freeze --exclude-editable 2>/dev/null | "$SCRATCH/bin/python" -c '
import re, sys
locked = dict(
    line.strip().split("==", 1)
    for line in open("requirements/lock.txt")
    if re.match(r"^[A-Za-z0-9_.-]+==", line)
)
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
locked = {norm(k): v for k, v in locked.items()}
changed = 0
for line in sys.stdin:
    if "==" not in line:
        continue
    name, version = line.strip().split("==", 1)
    old = locked.get(norm(name))
    if old is not None and old.split("+")[0] != version.split("+")[0]:
        print(f"  {name}: {old} -> {version}")
        changed += 1
print(f"  ({changed} changed)")
'
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg DAVSP_UNLOCKED=1  # drift is expected here
echo "[upgrade] ruff check"
"$SCRATCH/bin/ruff" check .
echo "[upgrade] pytest"
status=0
"$SCRATCH/bin/python" -m pytest -p no:cacheprovider -q "$@" || status=$?
if [ "$status" -eq 0 ]; then
  echo "[upgrade] green on the newest versions: bump with 'bash scripts/lock.sh' and commit"
else
  echo "[upgrade] RED on the newest versions (exit $status): the failures above name what broke"
fi
exit "$status"

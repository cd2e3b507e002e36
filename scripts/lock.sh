#!/usr/bin/env bash
# Regenerate requirements/lock.txt: the exact versions both README commands install.
#   bash scripts/lock.sh            # resolve the newest versions pyproject.toml's ranges allow
# The lock covers every extra (tiny, small, dev, adashield, vit); scripts/install.sh passes it
# to pip as a constraints file, so each install takes exactly these versions of what it needs.
# Run scripts/upgrade_check.sh first: it tests the newest versions before they are locked.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TOOLS="${LOCK_TOOLS_VENV:-${TMPDIR:-/tmp}/davsp-lock-tools}"
[ -x "$TOOLS/bin/pip-compile" ] || {
  "$PYTHON" -m venv "$TOOLS"
  "$TOOLS/bin/python" -m pip install --quiet "pip-tools==7.6.2" 2> >(grep -v "is ignored" >&2)
}
# pip-compile resolves with pip itself (its index and find-links settings), so torch==2.13.0
# resolves to the CPU wheel where pip is set up for one; the resolution runs on Python 3.11.
"$TOOLS/bin/pip-compile" --quiet --strip-extras --allow-unsafe --upgrade \
  --all-extras --no-emit-index-url --no-emit-find-links \
  --output-file requirements/lock.txt pyproject.toml 2> >(grep -v "is ignored" >&2)
# "+cpu" is this machine's wheel label: "torch==2.13.0" matches the CPU wheel and PyPI's alike
# the `small` extra names the project itself (`davsp-workbook[tiny]`): not a pin, drop it
sed -i '/^davsp-workbook @ file:/d' requirements/lock.txt
sed -i 's/^torch==\([0-9.]*\)+cpu$/torch==\1/' requirements/lock.txt
echo "[lock] wrote requirements/lock.txt ($(grep -c '==' requirements/lock.txt) pins)"

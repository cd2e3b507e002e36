#!/usr/bin/env bash
# Install the workbook into ./.venv. Usage: bash scripts/install.sh [EXTRAS]   (default: tiny)
#   EXTRAS is a pip extras list, e.g. "tiny", "dev" or "tiny,dev".
# Idempotent: re-running only installs what is missing. Every version comes from
# requirements/lock.txt (a constraints file made by scripts/lock.sh for CPython 3.11), so a
# fresh machine installs exactly what the test suite passed with. torch stays pinned to the CPU
# wheel in every pip command (an unpinned torch drags in gigabytes of CUDA wheels); on a GPU
# machine install your CUDA torch first and set TORCH_SPEC=torch (the lock's torch pin is then
# left out). DAVSP_UNLOCKED=1 skips the lock (scripts/upgrade_check.sh uses it).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-tiny}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

# Debian fonts used by the FigStep (FreeMonoBold) and MM-SafetyBench TYPO (Liberation Sans) renderers.
need_fonts=()
[ -f /usr/share/fonts/truetype/freefont/FreeMonoBold.ttf ] || need_fonts+=(fonts-freefont-ttf)
[ -f /usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf ] || need_fonts+=(fonts-liberation)
if [ ${#need_fonts[@]} -gt 0 ]; then
  if [ -z "${DAVSP_FONT_DIR:-}" ] && command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "[install] apt-get install ${need_fonts[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_fonts[@]}" >/dev/null
  elif [ -z "${DAVSP_FONT_DIR:-}" ]; then
    echo "[install] warning: install fonts ${need_fonts[*]} or set DAVSP_FONT_DIR" >&2
  fi
fi

VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi

constraints=()
if [ -z "${DAVSP_UNLOCKED:-}" ]; then
  version="$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  if [ "$version" != "3.11" ]; then
    echo "[install] error: requirements/lock.txt was resolved for Python 3.11, $VENV has $version;" \
      "run with PYTHON=python3.11 (delete $VENV first), or DAVSP_UNLOCKED=1 for unlocked ranges" >&2
    exit 2
  fi
  lock=requirements/lock.txt
  if [ "$TORCH_SPEC" != "torch==2.13.0" ]; then  # your own torch: keep the rest of the lock
    lock="$VENV/lock-without-torch.txt"
    grep -v '^torch==' requirements/lock.txt >"$lock"
  fi
  constraints=(--constraint "$lock")
fi
# pip keeps its own exit status; the filter only drops a warning some pip configs print per package.
pip_install() { "$VENV/bin/python" -m pip install --quiet "$@" 2> >(grep -v "is ignored" >&2); }
echo "[install] pip install -e .[$EXTRAS] ($TORCH_SPEC${constraints:+, locked})"
pip_install "${constraints[@]}" "$TORCH_SPEC" -e ".[$EXTRAS]"
"$VENV/bin/python" -c "import davsp_lib, torch, transformers, papermill; print('[install] ok: torch', torch.__version__, '| transformers', transformers.__version__)"

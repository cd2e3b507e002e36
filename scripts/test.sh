#!/usr/bin/env bash
# README command 2: install test dependencies, then lint and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh tiny,dev,adashield,vit
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
echo "[test] ruff check"
.venv/bin/ruff check .
echo "[test] pytest"
.venv/bin/python -m pytest -p no:cacheprovider "$@"

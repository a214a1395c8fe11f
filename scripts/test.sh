#!/usr/bin/env bash
# README command 2: lint and the whole test suite. Starts (and stops) the one-node
# SLURM cluster the tests need through tests/conftest.py (root required).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1
ruff check .
pytest -q -rs "$@"

#!/usr/bin/env bash
# README command 1: the whole DAG on the embedded default (offline, CPU).
# Extra arguments go to snakemake (e.g. --dry-run, or --profile slurm instead of local).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1
if [ "$#" -eq 0 ]; then set -- --profile local; fi
snakemake "$@"
echo "Done: reports/results.md, reports/previews/ (samples beside the real clips), metrics/ (dvc metrics show)."

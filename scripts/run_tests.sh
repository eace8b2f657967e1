#!/usr/bin/env bash
# Set up the environment (scripts/setup.sh) and run lint and the full test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${NEUROADA_VENV:-.venv}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1 WANDB_MODE=disabled
export TOKENIZERS_PARALLELISM=false
export NEUROADA_CACHE="${NEUROADA_CACHE:-$PWD/.cache}"
echo "[tests] ruff"
"$VENV/bin/ruff" check .
echo "[tests] pytest"
"$VENV/bin/python" -m pytest -q "$@"

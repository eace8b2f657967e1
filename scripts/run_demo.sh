#!/usr/bin/env bash
# Set up the environment (scripts/setup.sh) and run the main job on its embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1 WANDB_MODE=disabled
export TOKENIZERS_PARALLELISM=false
export NEUROADA_CACHE="${NEUROADA_CACHE:-$PWD/.cache}"
exec "${NEUROADA_VENV:-.venv}/bin/python" scripts/demo.py "$@"

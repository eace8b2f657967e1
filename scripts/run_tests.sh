#!/usr/bin/env bash
# Set up all environments and run lint and the full test suite (this is what CI runs).
#   .venv          training/tests (scripts/setup.sh)
#   .venv-axolotl  Axolotl 0.19 pins that conflict with the rest (scripts/setup_axolotl.sh)
#   .venv-vllm     vLLM for serving merged checkpoints (scripts/setup_vllm.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_axolotl.sh
bash scripts/setup_vllm.sh
VENV="${NEUROADA_VENV:-.venv}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1 WANDB_MODE=disabled
export AXOLOTL_DO_NOT_TRACK=1 VLLM_NO_USAGE_STATS=1 TOKENIZERS_PARALLELISM=false
export NEUROADA_CACHE="${NEUROADA_CACHE:-$PWD/.cache}"
echo "[tests] ruff"
"$VENV/bin/ruff" check .
echo "[tests] pytest"
"$VENV/bin/python" -m pytest -q --durations=15 "$@"

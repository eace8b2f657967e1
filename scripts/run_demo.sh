#!/usr/bin/env bash
# Set up the environments and run the main job on its embedded defaults (offline):
# TRL SFT of SmolLM2-135M-Instruct with NeuroAda (held-out accuracy before/after, trainable %)
# -> neuroada-merge -> vLLM OpenAI server -> one held-out question answered (an example), then the
# served model's held-out accuracy beside the adapter's (fails if they disagree beyond near-ties).
# Extra arguments go to serving/full_loop.py (see --help); scripts/demo.py is the short,
# vLLM-free variant (train, save, reload, merge, compare).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_vllm.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1 WANDB_MODE=disabled
export VLLM_NO_USAGE_STATS=1 TOKENIZERS_PARALLELISM=false
export NEUROADA_CACHE="${NEUROADA_CACHE:-$PWD/.cache}"
exec "${NEUROADA_VENV:-.venv}/bin/python" serving/full_loop.py "$@"

#!/usr/bin/env bash
# Multi-GPU confirmation run (NOT run on the CPU-only development machines; see README "Multi-GPU").
# Needs >= 2 CUDA GPUs and the .venv of scripts/setup.sh with a CUDA build of torch.
#
#   bash scripts/gpu_multi_check.sh [num_gpus]      # default 2; ~5 min on 2 GPUs
#
# 1. The CPU multi-process tests (gloo) still pass on this machine; the op tests that take
#    `--device` (tests/test_smoa.py: fused and separate paths vs the float64 formula) pass on CUDA.
# 2. examples/trl/sft.py (SmolLM2-135M, 8 steps, bf16) under accelerate with ZeRO-3, FSDP2
#    (cpu_ram_efficient_loading) and DDP, each with NCCL on the GPUs.
# 3. Each saved adapter is complete (theta and indices of every layer, full shapes) and its
#    indices equal per-row top-|W| of the base weights, checked in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
NGPU="${1:-2}"
PY=.venv/bin/python
OUT="${NEUROADA_GPU_CHECK_OUT:-outputs/gpu-multi-check}"
mkdir -p "$OUT"
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

echo "[gpu-check] CPU multi-process tests"
"$PY" -m pytest -q tests/test_distributed_zero3.py tests/test_distributed_ddp_fsdp.py tests/test_distributed_qlora.py \
  tests/test_distributed_trl.py
"$PY" -m pytest -q tests/test_smoa.py --device cuda

for kind in zero3 fsdp2 ddp; do
  echo "[gpu-check] examples/trl/sft.py under accelerate ($kind, $NGPU GPUs)"
  .venv/bin/accelerate launch --config_file "examples/trl/accelerate/$kind.yaml" --num_processes "$NGPU" \
    examples/trl/sft.py --max_steps 8 --per_device_train_batch_size 4 --bf16 true \
    --output_dir "$OUT/sft-$kind"
done

"$PY" - "$OUT" <<'PY'
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from harness.models import smollm2_checkpoint

base = load_file(next(Path(smollm2_checkpoint()).glob("*.safetensors")))
for kind in ("zero3", "fsdp2", "ddp"):
    adapter = load_file(Path(sys.argv[1]) / f"sft-{kind}" / "adapter_model.safetensors")
    thetas = {k: v for k, v in adapter.items() if k.endswith("neuroada_theta")}
    assert thetas, f"{kind}: no theta in the adapter"
    for key, theta in thetas.items():
        layer = key.removeprefix("base_model.model.").removesuffix(".neuroada_theta")
        weight = base[f"{layer}.weight"].float()
        indices = adapter[key.replace("neuroada_theta", "neuroada_indices")]
        assert theta.shape == indices.shape == (weight.shape[0], indices.shape[1]), (kind, key, theta.shape)
        order = torch.sort(weight.abs(), dim=1, descending=True, stable=True).indices[:, : indices.shape[1]]
        assert torch.equal(indices, order.sort(dim=1).values), (kind, key, "indices are not top-|W|")
        assert theta.abs().sum() > 0, (kind, key, "theta did not train")
    print(f"[gpu-check] {kind}: {len(thetas)} layers complete, indices = top-|W|, theta trained")
PY
echo "[gpu-check] OK"

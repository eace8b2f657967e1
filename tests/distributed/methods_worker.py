"""SMoA and NeFT (any registered method, by ``--method``) under DDP, FSDP1 and FSDP2 on 2 CPU processes (gloo).

Launched by tests/test_distributed_methods.py with ``torch.distributed.run``. Each mode creates the
method's data-free adapter (``MethodSpec.data_free_config``) on every rank, trains STEPS AdamW steps on
this rank's half of the global batch and writes the full trainable tensors and the adapter's buffers
(SMoA's spectral orderings, NeFT's selected neurons) of both ranks, for the test to compare with one
process on the whole batch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from tests.distributed.common import adapter_buffers_of, adapter_tensors_of, method_config, write_rank_results
from tests.distributed.ddp_fsdp_worker import shard, shard_fsdp1, train


def build(base: Path, method: str) -> torch.nn.Module:
    return get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), method_config(method))


def full(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in tensors.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--methods", default="smoa,neft")
    parser.add_argument("--modes", default="ddp,fsdp1,fsdp2")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    data = torch.load(args.data)
    result: dict = {}
    for method in args.methods.split(","):
        for mode in args.modes.split(","):
            torch.manual_seed(0)  # as the single-process reference: the same random initial factors
            info: dict = {}
            tensors: dict = {}
            buffers: dict = {}
            try:
                model = build(args.base, method)
                buffers = adapter_buffers_of(model)  # before wrapping: FSDP1 flattens nothing but parameters
                if mode == "ddp":
                    info["losses"] = train(model, data, rank, ddp=True)
                    tensors = adapter_tensors_of(model)
                elif mode == "fsdp2":
                    model = shard(model)
                    info["losses"] = train(model, data, rank)
                    tensors = full(_trainable(model))
                elif mode == "fsdp1":
                    from torch.distributed.fsdp import FullyShardedDataParallel

                    model = shard_fsdp1(model)
                    info["losses"] = train(model, data, rank)
                    with FullyShardedDataParallel.summon_full_params(model):
                        tensors = adapter_tensors_of(model)
                else:
                    raise SystemExit(f"unknown mode {mode}")
            except Exception as error:  # recorded, so the other runs still go and the test names the failure
                import traceback

                info["error"] = f"{type(error).__name__}: {error}\n{traceback.format_exc()[-4000:]}"
                model = None
            torch.save(tensors, args.out / f"{method}_{mode}_tensors_rank{rank}.pt")
            torch.save(buffers, args.out / f"{method}_{mode}_buffers_rank{rank}.pt")
            result[f"{method}_{mode}"] = info
            del model
            dist.barrier()
    write_rank_results(args.out, rank, result)
    dist.destroy_process_group()


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters as DTensors (FSDP2), keyed like ``adapter_tensors_of``, not yet gathered."""
    from tests.distributed.common import _key

    return {_key(n): p.detach() for n, p in model.named_parameters() if p.requires_grad}


if __name__ == "__main__":
    main()

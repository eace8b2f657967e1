"""NEAT (``NeatConfig``) under DDP, FSDP1 (``use_orig_params``) and FSDP2 (``fully_shard``) on 2 CPU processes (gloo).

Launched by tests/test_distributed_neat.py with ``torch.distributed.run``. Each mode trains STEPS AdamW
steps on this rank's half of the global batch; both ranks write their full NEAT tensors and their
full base weights after training, for the test to compare with one process on the whole batch.

NEAT's forward reads the whole frozen ``W0`` of every adapted layer (``act(A @ W0)``) and its backward reads
it again (A's gradient is ``grad @ W0.T``), keeping nothing in between; under FSDP the weight is whole only
inside its unit's forward and backward, which is what the FSDP modes exercise.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from tests.distributed.common import base_of, neat_config, neat_of, write_rank_results
from tests.distributed.ddp_fsdp_worker import shard, shard_fsdp1, train


def build(base: Path) -> torch.nn.Module:
    return get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), neat_config())


def full(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gather DTensors (FSDP2 shards) into whole tensors on every rank."""
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in tensors.items()}


@contextmanager
def saved_weight_bytes(model: torch.nn.Module, info: dict):
    """Record, for every tensor autograd saves that is an adapted layer's W0 (the base layer's matmul saves it;
    NEAT's ``A @ W0`` must not), its storage size in bytes right after the forward pass and when backward
    reads it: under FSDP2 the first is 0 (resharded after the unit's forward) and the second is the whole
    weight again (gathered for the unit's backward)."""
    layers = [m.base_layer for m in model.modules() if hasattr(m, "neat_A")]
    current: list[torch.Tensor] = []
    info["saved_w0_bytes_after_forward"], info["saved_w0_bytes_in_backward"] = [], []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        # Inside a unit's forward its layers hold the gathered (plain) weight; the others hold DTensor shards.
        gathered = [layer.weight for layer in layers if not hasattr(layer.weight, "full_tensor")]
        if any(tensor.untyped_storage().data_ptr() == w.untyped_storage().data_ptr() for w in gathered):
            current.append(tensor)
        return tensor

    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        if any(tensor is saved for saved in current):
            info["saved_w0_bytes_in_backward"].append(tensor.untyped_storage().nbytes())
        return tensor

    def before_forward(*_) -> None:
        current.clear()

    def after_forward(*_) -> None:
        info["saved_w0_bytes_after_forward"].extend(t.untyped_storage().nbytes() for t in current)

    handles = [model.register_forward_pre_hook(before_forward), model.register_forward_hook(after_forward)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        for handle in handles:
            handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--modes", default="ddp,fsdp1,fsdp2")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    data = torch.load(args.data)
    result: dict = {}

    for mode in args.modes.split(","):
        torch.manual_seed(0)  # as the single-process reference: the same random A, B, E, D on both ranks
        info: dict = {}
        try:
            if mode == "ddp":
                model = build(args.base)
                info["losses"] = train(model, data, rank, ddp=True)
                tensors, base = neat_of(model), base_of(model)
            elif mode == "fsdp2":
                model = shard(build(args.base))
                info["neat_is_dtensor"] = all(hasattr(p, "full_tensor") for p in neat_of(model).values())
                info["base_is_dtensor"] = all(hasattr(p, "full_tensor") for p in base_of(model).values())
                with saved_weight_bytes(model, info):
                    info["losses"] = train(model, data, rank)
                tensors, base = full(neat_of(model)), full(base_of(model))
            elif mode == "fsdp1":
                from torch.distributed.fsdp import FullyShardedDataParallel

                model = shard_fsdp1(build(args.base))
                info["losses"] = train(model, data, rank)
                with FullyShardedDataParallel.summon_full_params(model):
                    tensors, base = neat_of(model), base_of(model)
            else:
                raise SystemExit(f"unknown mode {mode}")
        except Exception as error:  # recorded, so the other modes still run and the test names the failure
            import traceback

            info["error"] = f"{type(error).__name__}: {error}\n{traceback.format_exc()[-4000:]}"
            tensors, base = {}, {}
            model = None
        torch.save(tensors, args.out / f"{mode}_neat_rank{rank}.pt")
        torch.save(base, args.out / f"{mode}_base_rank{rank}.pt")
        result[mode] = info
        del model
        dist.barrier()

    write_rank_results(args.out, rank, result)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

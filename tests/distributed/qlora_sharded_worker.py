"""NeuroAda and NEAT on a 4-bit base under sharding (FSDP-QLoRA, ZeRO-3 + 4-bit) on 2 CPU processes (gloo).

Launched by tests/test_distributed_qlora.py with ``torch.distributed.run`` and ``DS_ACCELERATOR=cpu``.
Each mode loads the tiny base in bitsandbytes NF4, creates the adapter, shards the model, trains STEPS
AdamW steps on this rank's half of the global batch and writes theta (full tensors) and the indices
for the test to compare with one process on the 4-bit base:

* ``fsdp2``: ``fully_shard`` per decoder layer, ``bnb_4bit_quant_storage=bfloat16`` (what Axolotl's
  FSDP-QLoRA sets): FSDP2 shards the packed 4-bit weights next to float32 theta and norms;
* ``fsdp1``: ``FullyShardedDataParallel(use_orig_params=True)``, storage float32. FSDP1 flattens a
  unit's parameters into one tensor of one dtype, so bfloat16 storage beside float32 theta is refused
  by torch itself; ``fsdp1_bf16`` records that refusal (the reason the Axolotl validation refuses
  FSDP1 with a quantized base);
* ``zero3``: ``deepspeed.initialize`` with ZeRO-3, storage bfloat16: DeepSpeed partitions the packed
  weights (transformers loads a quantized model outside ``zero.Init``); the adapter is then saved the
  way the Trainer saves under ZeRO-3 (consolidated 16-bit state dict, rank 0);
* ``zero3_8bit``: the same on an LLM.int8 base (``load_in_8bit``). FSDP2 on an 8-bit base fails
  without Axolotl's FSDP2 patches (``Int8Params`` loses its ``CB``/``SCB`` when sharded), so it is
  refused by the Axolotl validation and not run here;
* ``neat_fsdp2`` / ``neat_zero3`` / ``neat_zero3_8bit``: NEAT (depth 1, B random) as ``fsdp2`` / ``zero3`` /
  ``zero3_8bit``: NEAT reads the
  dequantized W0 in every forward and again in backward (under ZeRO-3 the packed bytes are gathered
  for each read); its A, B, E, D are written instead of theta.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from neuroada_plugin.neuroada.distributed import check_rank_agreement
from tests.distributed.common import (
    LR,
    STEPS,
    indices_of,
    neat_config,
    neat_of,
    nf4_config,
    peft_config,
    rank_batch,
    theta_of,
    write_rank_results,
    zero3_config,
)

# Mode -> bnb_4bit_quant_storage of its NF4 base; "8bit": LLM.int8 (Linear8bitLt) instead.
STORAGE = {
    "fsdp1": torch.float32,
    "fsdp1_bf16": torch.bfloat16,
    "fsdp2": torch.bfloat16,
    "zero3": torch.bfloat16,
    "zero3_8bit": "8bit",
    "neat_fsdp2": torch.bfloat16,
    "neat_zero3": torch.bfloat16,
    "neat_zero3_8bit": "8bit",
}


def is_neat(mode: str) -> bool:
    return mode.startswith("neat_")


def build(base: Path, mode: str) -> torch.nn.Module:
    from transformers import BitsAndBytesConfig

    torch.manual_seed(0)
    storage = STORAGE[mode]
    quantization = BitsAndBytesConfig(load_in_8bit=True) if storage == "8bit" else nf4_config(storage)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, quantization_config=quantization)
    model = get_peft_model(model, neat_config() if is_neat(mode) else peft_config())
    # Training mode, as the Trainer and the one-process reference (from_pretrained returns eval mode, in which
    # bitsandbytes packs 4-bit weights for its CPU kernel on AVX512-BF16 CPUs).
    model.train()
    return model


def trained_of(mode: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return neat_of(model) if is_neat(mode) else theta_of(model)


def packed_weight(model: torch.nn.Module) -> torch.Tensor:
    return model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight


def fsdp1(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return FullyShardedDataParallel(
        model, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}), use_orig_params=True, device_id="cpu"
    )


def fsdp2(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def train(step_fn, model: torch.nn.Module, data: torch.Tensor, rank: int) -> list[float]:
    losses = []
    for step in range(STEPS):
        batch = rank_batch(data, step, rank)
        losses.append(step_fn(model(input_ids=batch, labels=batch).loss))
    return losses


def adamw_step(model: torch.nn.Module):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)

    def step(loss: torch.Tensor) -> float:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    return step


def run_fsdp(mode: str, args: argparse.Namespace, rank: int, data: torch.Tensor) -> tuple[dict, dict, dict]:
    model = build(args.base, mode)
    info: dict = {"weight_class": type(packed_weight(model)).__name__, "weight_dtype": str(packed_weight(model).dtype)}
    info["agreement_buffers"] = 0 if is_neat(mode) else check_rank_agreement(model)
    indices = {} if is_neat(mode) else indices_of(model)
    if mode == "fsdp1_bf16":
        try:
            fsdp1(model)
            info["wrapped"] = "accepted"
        except ValueError as error:
            info["wrapped"] = f"refused: {error}"
        return info, {}, indices
    if mode == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = fsdp1(model)
        info["losses"] = train(adamw_step(model), model, data, rank)
        with FullyShardedDataParallel.summon_full_params(model):
            theta = {k: v.clone() for k, v in theta_of(model).items()}
    else:
        model = fsdp2(model)
        info["weight_is_dtensor"] = hasattr(packed_weight(model), "full_tensor")
        info["losses"] = train(adamw_step(model), model, data, rank)
        theta = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in trained_of(mode, model).items()}
    return info, theta, indices


def run_zero3(mode: str, args: argparse.Namespace, rank: int, data: torch.Tensor) -> tuple[dict, dict, dict]:
    import deepspeed

    ds_config = zero3_config()
    model = build(args.base, mode)
    info: dict = {"weight_class": type(packed_weight(model)).__name__}
    info["agreement_buffers"] = 0 if is_neat(mode) else check_rank_agreement(model)
    indices = {} if is_neat(mode) else indices_of(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    weight = packed_weight(engine.module)
    info["weight_partitioned"] = weight.numel() == 0 and hasattr(weight, "ds_status")

    def step(loss: torch.Tensor) -> float:
        engine.backward(loss)
        engine.step()
        return loss.item()

    engine.train()
    info["losses"] = train(step, engine, data, rank)
    state = engine._zero3_consolidated_16bit_state_dict()  # what the Trainer saves under ZeRO-3
    if rank == 0:
        engine.module.save_pretrained(args.out / f"{mode}_adapter", state_dict=state)
    params = [p for n, p in engine.module.named_parameters() if ".neuroada_theta." in n or ".neat_" in n]
    with deepspeed.zero.GatheredParameters(params):
        theta = {k: v.clone() for k, v in trained_of(mode, engine.module).items()}
    return info, theta, indices


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--modes", default="fsdp1_bf16,fsdp1,fsdp2,neat_fsdp2,zero3,zero3_8bit,neat_zero3,neat_zero3_8bit")
    args = parser.parse_args()
    if "zero3" in args.modes:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    rank = dist.get_rank()
    data = torch.load(args.data)
    result: dict = {}
    for mode in args.modes.split(","):  # zero3 last: the engine keeps global DeepSpeed state
        run = run_zero3 if "zero3" in mode else run_fsdp
        info, theta, indices = run(mode, args, rank, data)
        if indices:
            torch.save(indices, args.out / f"{mode}_indices_rank{rank}.pt")
        if rank == 0 and theta:
            torch.save({k: v.detach().cpu().float() for k, v in theta.items()}, args.out / f"{mode}_theta.pt")
        result[mode] = info
        dist.barrier()
    write_rank_results(args.out, rank, result)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

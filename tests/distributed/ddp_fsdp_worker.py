"""DDP, FSDP1, FSDP2 (``fully_shard``) and RAM-efficient loading on 2 CPU processes (gloo).

Launched by tests/test_distributed_ddp_fsdp.py with ``torch.distributed.run``. Each mode trains
STEPS AdamW steps on this rank's half of the global batch; rank 0 writes theta (full tensors) and
both ranks write their indices, for the test to compare with one process on the whole batch.

``--modes meta``: rank 1 builds the model with its weights on the meta device (what accelerate's
``cpu_ram_efficient_loading`` does), creates the adapter there (no selection can run: the indices
are meta placeholders), and receives rank 0's state (parameters and persistent buffers, i.e. the
indices) through the full-state-dict broadcast accelerate uses for FSDP2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from neuroada_plugin.kit.sharded import agree_across_ranks
from neuroada_plugin.neuroada.distributed import RankDisagreementError, check_rank_agreement
from tests.distributed.common import LR, STEPS, indices_of, peft_config, rank_batch, theta_of, write_rank_results


def build(base: Path, meta: bool) -> torch.nn.Module:
    if meta:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base), dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return get_peft_model(model, peft_config())


def shard(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def shard_fsdp1(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP1 with ``use_orig_params`` (frozen base and trainable adapter in one flat parameter), one unit per
    decoder layer."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return FullyShardedDataParallel(
        model,
        auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
        use_orig_params=True,
        device_id=torch.device("cpu"),
    )


def full_theta(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in theta_of(model).items():
        out[key] = value.full_tensor() if hasattr(value, "full_tensor") else value
    return out


def train(model: torch.nn.Module, data: torch.Tensor, rank: int, ddp: bool = False) -> list[float]:
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    wrapped.train()
    losses = []
    for step in range(STEPS):
        batch = rank_batch(data, step, rank)
        loss = wrapped(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--modes", default="agreement,ddp,fsdp1,fsdp2,meta")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    data = torch.load(args.data)
    result: dict = {}

    for mode in args.modes.split(","):
        torch.manual_seed(0)
        info: dict = {}
        if mode == "agreement":
            # A rank that selected differently: the broadcast hands it rank 0's indices; the check names the buffer.
            local = torch.arange(6, dtype=torch.int64).view(3, 2) + 10 * rank
            info["agreed"] = agree_across_ranks(local, where="probe").tolist()
            model = build(args.base, meta=False)
            if rank == 1:
                buffer = model.base_model.model.model.layers[1].mlp.up_proj.neuroada_indices["default"]
                buffer[0] = buffer[0].flip(0)
            try:
                check_rank_agreement(model)
                info["check"] = "passed"
            except RankDisagreementError as error:
                info["check"] = f"raised: {error}"
            theta = {}
        elif mode == "ddp":
            model = build(args.base, meta=False)
            info["agreement_buffers"] = check_rank_agreement(model)
            info["losses"] = train(model, data, rank, ddp=True)
            theta = full_theta(model)
        elif mode == "fsdp2":
            model = shard(build(args.base, meta=False))
            info["theta_is_dtensor"] = all(hasattr(p, "full_tensor") for p in theta_of(model).values())
            info["agreement_buffers"] = check_rank_agreement(model)
            info["losses"] = train(model, data, rank)
            theta = full_theta(model)
        elif mode == "fsdp1":
            from torch.distributed.fsdp import FullyShardedDataParallel

            model = shard_fsdp1(build(args.base, meta=False))
            info["agreement_buffers"] = check_rank_agreement(model)
            info["losses"] = train(model, data, rank)
            with FullyShardedDataParallel.summon_full_params(model):
                theta = {k: v.clone() for k, v in theta_of(model).items()}
        elif mode == "meta":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            model = build(args.base, meta=rank != 0)
            info["meta_before_broadcast"] = any(b.is_meta for n, b in model.named_buffers() if "neuroada_indices" in n)
            info["weights_meta_before_broadcast"] = any(p.is_meta for p in model.parameters())
            full_state = model.state_dict() if rank == 0 else {}
            persistent = {n for n, _ in model.state_dict().items()}
            keep = {n: b.clone() for n, b in model.named_buffers() if n not in persistent}  # e.g. rotary inv_freq
            shard(model)
            model.to_empty(device="cpu")
            set_model_state_dict(
                model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
            )
            for name, value in keep.items():
                module, _, leaf = name.rpartition(".")
                model.get_submodule(module).register_buffer(leaf, value, persistent=False)
            info["agreement_buffers"] = check_rank_agreement(model)
            info["losses"] = train(model, data, rank)
            theta = full_theta(model)
        else:
            raise SystemExit(f"unknown mode {mode}")
        torch.save(indices_of(model), args.out / f"{mode}_indices_rank{rank}.pt")
        if rank == 0:
            torch.save(theta, args.out / f"{mode}_theta.pt")
        result[mode] = info
        del model
        dist.barrier()

    write_rank_results(args.out, rank, result)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

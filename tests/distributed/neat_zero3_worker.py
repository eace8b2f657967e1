"""NEAT under DeepSpeed ZeRO-3 on 2 CPU processes: W0 partitioned, gathered for each read in forward and backward.

Launched by tests/test_distributed_neat_zero3.py with ``torch.distributed.run`` and ``DS_ACCELERATOR=cpu``.
The base is loaded by ``from_pretrained`` under ZeRO-3 (every rank holds a partition of every weight);
NEAT's forward reads the whole W0 of each adapted layer (``act(A @ W0)``) and its backward reads it again
(A's gradient is ``grad @ W0.T``), both through the kit's gathered read. Rank 0 writes the initial and the
saved (Trainer-style consolidated) adapter, the logits, and the weights merged and unmerged under ZeRO-3.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import deepspeed
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from neuroada_plugin.kit.sharded import is_partitioned
from tests.distributed.common import LR, STEPS, neat_config, neat_of, rank_batch, write_rank_results, zero3_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    ds_config = zero3_config()
    keep_alive = HfDeepSpeedConfig(ds_config)  # from_pretrained builds the model under zero.Init
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    result: dict = {"partitioned": is_partitioned(base.model.layers[0].self_attn.q_proj.weight)}
    torch.manual_seed(0)  # as the one-process reference, right before the adapter draws its random tensors
    model = get_peft_model(base, neat_config())
    if rank == 0:
        torch.save(neat_of(model), args.out / "initial.pt")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    result["neat_partitioned"] = all(is_partitioned(p) for n, p in engine.module.named_parameters() if ".neat_" in n)
    data = torch.load(args.data)
    engine.train()
    losses = []
    for step in range(STEPS):
        batch = rank_batch(data, step, rank)
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    result["losses"] = losses

    state = engine._zero3_consolidated_16bit_state_dict()  # what the Trainer saves under ZeRO-3
    if rank == 0:
        engine.module.save_pretrained(args.out / "adapter", state_dict=state)
    engine.eval()
    probe = data[0]
    with torch.no_grad():
        torch.save(engine(input_ids=probe).logits.cpu(), args.out / f"logits_rank{rank}.pt")
        engine.module.merge_adapter()  # per layer: gathered, merged, written back from rank 0
        merged = engine._zero3_consolidated_16bit_state_dict()
        merged_logits = engine(input_ids=probe).logits.cpu()
        engine.module.unmerge_adapter()
        restored = engine._zero3_consolidated_16bit_state_dict()
        restored_logits = engine(input_ids=probe).logits.cpu()
    torch.save({"merged": merged_logits, "restored": restored_logits}, args.out / f"merge_logits_rank{rank}.pt")
    if rank == 0:
        torch.save({"before": state, "merged": merged, "restored": restored}, args.out / "merge.pt")
    write_rank_results(args.out, rank, result)
    del keep_alive


if __name__ == "__main__":
    main()

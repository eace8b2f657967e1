"""DeepSpeed ZeRO-3 on 2 CPU processes: selection from partitioned weights, engine steps, save, merge.

Launched by tests/test_distributed_zero3.py with ``torch.distributed.run`` and ``DS_ACCELERATOR=cpu``.
The base model is loaded by ``from_pretrained`` under ZeRO-3 (``HfDeepSpeedConfig`` alive), i.e. built
inside ``deepspeed.zero.Init``: every rank holds a partition of every weight when the adapter is created.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import deepspeed
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from neuroada_plugin.errors import AdapterCheckpointError
from neuroada_plugin.kit.sharded import is_partitioned
from neuroada_plugin.neuroada.distributed import check_rank_agreement
from tests.distributed.common import (
    LR,
    STEPS,
    indices_of,
    peft_config,
    rank_batch,
    write_rank_results,
    zero3_config,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    args = parser.parse_args()

    t0 = time.time()
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    ds_config = zero3_config()
    keep_alive = HfDeepSpeedConfig(ds_config)  # makes from_pretrained build the model under zero.Init
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    weight = base.model.layers[0].self_attn.q_proj.weight
    result: dict = {"partitioned": is_partitioned(weight), "local_numel": weight.numel()}

    model = get_peft_model(base, peft_config())
    torch.save(indices_of(model), args.out / f"indices_rank{rank}.pt")
    result["agreement_buffers"] = check_rank_agreement(model)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    theta = next(p for n, p in engine.module.named_parameters() if ".neuroada_theta." in n)
    result["theta_partitioned"] = is_partitioned(theta)

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
    result["t_train"] = time.time() - t0

    statuses = {
        str(getattr(p, "ds_status", None)) for n, p in engine.module.named_parameters() if "neuroada_theta" in n
    }
    result["theta_status_after_steps"] = sorted(statuses)
    base_statuses = {
        str(getattr(p, "ds_status", None)) for n, p in engine.module.named_parameters() if "neuroada_" not in n
    }
    result["base_status_after_steps"] = sorted(base_statuses)
    # A plain save_pretrained of the sharded model would write partitions: it must refuse.
    try:
        engine.module.save_pretrained(args.out / f"naive_rank{rank}")
        result["naive_save"] = "written"
    except AdapterCheckpointError as error:
        result["naive_save"] = f"refused: {error}"

    # What Trainer does under ZeRO-3: consolidate on every rank, save on rank 0.
    state = engine._zero3_consolidated_16bit_state_dict()
    if rank == 0:
        engine.module.save_pretrained(args.out / "adapter", state_dict=state)

    engine.eval()
    probe = data[0]
    with torch.no_grad():
        logits = engine(input_ids=probe).logits
    torch.save(logits.cpu(), args.out / f"logits_rank{rank}.pt")
    # DPO's reference forward: the same sharded policy with the adapter disabled.
    with torch.no_grad(), engine.module.disable_adapter():
        reference = engine(input_ids=probe).logits
    torch.save(reference.cpu(), args.out / f"disabled_logits_rank{rank}.pt")

    # Merge under ZeRO-3, per layer (each layer gathers itself and writes back from rank 0).
    result["base_status_before_merge"] = sorted(
        {str(p.ds_status) for n, p in engine.module.named_parameters() if "neuroada_" not in n}
    )
    engine.module.merge_adapter()
    merged = engine._zero3_consolidated_16bit_state_dict()
    with torch.no_grad():
        merged_logits = engine(input_ids=probe).logits
    engine.module.unmerge_adapter()
    restored = engine._zero3_consolidated_16bit_state_dict()
    torch.save(merged_logits.cpu(), args.out / f"merged_logits_rank{rank}.pt")

    # TRL's GRPO vLLM sync: gather the whole model, merge, read, unmerge, inside the one gather.
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        engine.module.merge_adapter()
        trl_merged = {n: p.detach().clone() for n, p in engine.module.named_parameters() if "neuroada_" not in n}
        engine.module.unmerge_adapter()
        trl_restored = {n: p.detach().clone() for n, p in engine.module.named_parameters() if "neuroada_" not in n}
    if rank == 0:
        torch.save(
            {
                "merged": merged,
                "restored": restored,
                "before": state,
                "trl_merged": trl_merged,
                "trl_restored": trl_restored,
            },
            args.out / "merge.pt",
        )

    # Loading values into the engine's partitioned theta would be undone by the optimizer's copy: refused clearly.
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        set_peft_model_state_dict(engine.module, load_file(args.out / "adapter" / "adapter_model.safetensors"))
        result["load_into_engine"] = "loaded"
    except AdapterCheckpointError as error:
        result["load_into_engine"] = f"refused: {error}"

    # Load the saved adapter onto a fresh ZeRO-3 model (shape validation on partitioned weights), then
    # merge_and_unload without an engine: every layer is gathered, merged and written back on its own.
    torch.distributed.barrier()
    fresh = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(fresh, args.out / "adapter")
    result["fresh_partitioned"] = all(is_partitioned(p) for n, p in loaded.named_parameters() if "neuroada_" not in n)
    unloaded = loaded.merge_and_unload()
    with deepspeed.zero.GatheredParameters(list(unloaded.parameters())):
        if rank == 0:
            torch.save({n: p.detach().clone() for n, p in unloaded.named_parameters()}, args.out / "unloaded.pt")
    result["t_total"] = time.time() - t0
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["local_param_bytes"] = sum(
        (p.ds_tensor.numel() * p.ds_tensor.element_size()) if is_partitioned(p) else p.numel() * p.element_size()
        for p in engine.module.parameters()
    )
    result["full_param_bytes"] = sum(
        (p.ds_numel if is_partitioned(p) else p.numel()) * p.element_size() for p in engine.module.parameters()
    )
    write_rank_results(args.out, rank, result)
    del keep_alive


if __name__ == "__main__":
    main()

"""TRL SFTTrainer and DPOTrainer with NeuroAdaConfig, run by ``accelerate launch`` (2 CPU processes)
or in one process (the reference). The global batch is the whole dataset every step, so both runs see
the same examples per step whatever the sampler order; each run saves its adapters under ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from harness import commonsense as cs
from neuroada_plugin import NeuroAdaConfig

GLOBAL_BATCH = 4
STEPS = 3


def common_args(out: Path, world: int) -> dict:
    return dict(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        seed=0,
        disable_tqdm=True,
        dataloader_drop_last=True,
        use_cpu=not torch.cuda.is_available(),  # transformers runs multi-process on the CPU only with use_cpu
    )


def sft_data() -> Dataset:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (GLOBAL_BATCH, 24), generator=generator).tolist()
    return Dataset.from_list([{"input_ids": row} for row in ids])  # pre-tokenized, equal lengths


def _sharding(trainer) -> str:
    """How the trained model is distributed: "fsdp2" (theta is a DTensor), "fsdp1", "ddp" or "none"."""
    theta = next(p for n, p in trainer.model.named_parameters() if "neuroada_theta" in n)
    if hasattr(theta, "full_tensor"):
        return "fsdp2"
    wrapped = type(trainer.model_wrapped).__name__
    return {"FullyShardedDataParallel": "fsdp1", "DistributedDataParallel": "ddp"}.get(wrapped, f"none ({wrapped})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    sft = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32),
        args=SFTConfig(**common_args(args.out / "sft", args.world), max_length=32),
        train_dataset=sft_data(),
        processing_class=tokenizer,
        peft_config=NeuroAdaConfig(top_k=2),
    )
    sft.train()
    sharding = {"sft": _sharding(sft)}
    sft.save_model(str(args.out / "sft"))
    logs = {"sft": [e["loss"] for e in sft.state.log_history if "loss" in e]}
    world = sft.accelerator.num_processes
    del sft

    questions = cs.make_splits(cs.load_source("obqa")).train[:GLOBAL_BATCH]
    dpo = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32),
        args=DPOConfig(**common_args(args.out / "dpo", args.world), beta=0.1, max_length=128),
        train_dataset=Dataset.from_list(cs.dpo_rows(questions)),
        processing_class=tokenizer,
        peft_config=NeuroAdaConfig(top_k=2),
    )
    assert dpo.ref_model is None  # reference = the policy with the adapter disabled
    dpo.train()
    sharding["dpo"] = _sharding(dpo)
    dpo.save_model(str(args.out / "dpo"))
    logs["dpo"] = [e["loss"] for e in dpo.state.log_history if "loss" in e]
    logs["dpo_margins"] = [e["rewards/margins"] for e in dpo.state.log_history if "rewards/margins" in e]
    logs["world"] = world
    logs["sharding"] = sharding
    if dpo.accelerator.is_main_process:
        (args.out / "result.json").write_text(json.dumps(logs))


if __name__ == "__main__":
    main()

"""SAFE (selective adapter freezing) with the plain Transformers ``Trainer`` under DDP on 2 CPU processes (gloo).

Launched by tests/test_distributed_safe.py with ``torch.distributed.run``. Per method (NeuroAda top-2, PEFT
LoRA, NeuroAda freezing from the input side under gradient checkpointing) each rank trains STEPS AdamW
steps with ``SAFECallback`` on settings that freeze within the first steps, and writes SAFE's history and
freeze steps, each parameter's value when it froze (seen by
:class:`FreezeRecorder`, placed after SAFE), the final adapter values and the parameters that still
have optimizer state. The dataset is exactly one global batch (WORLD * MICRO rows), so every step of
the 2-rank run and of the single-process reference (:func:`train`, ``world=1``, in the test) sees the
same rows whatever the sampler order.

``--find-unused false``: the same run with ``ddp_find_unused_parameters=False``, which SAFE refuses.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from neuroada_plugin import SAFECallback
from tests.distributed.common import LR, MICRO, TARGETS, VOCAB, WORLD, peft_config, write_rank_results
from tests.tiny_models import tiny_llama

STEPS = 12
LENGTH = 24
LAYERS = 4
# Checks every step after a 2-step warm-up, threshold 1.0 by step 6, at most half of the 4 blocks frozen.
SETTINGS = dict(warmup_steps=2, freeze_end_steps=6, check_every=1, max_threshold=1.0, max_frozen_fraction=0.5)
# "neuroada_input": NeuroAda with freeze_from_input_only and non-reentrant gradient checkpointing, so that the
# lowest block freezes and SAFE cuts the graph at the embedding output (which checkpointing makes require grad).
METHODS = ("neuroada", "lora", "neuroada_input")


def build(method: str) -> torch.nn.Module:
    """The tiny 4-layer Llama (seed 0) with a NeuroAda (top-2) or LoRA (r=4) adapter on every projection."""
    base = tiny_llama(0, vocab_size=VOCAB, num_hidden_layers=LAYERS)
    config = LoraConfig(r=4, target_modules=TARGETS) if method == "lora" else peft_config()  # neuroada*
    model = get_peft_model(base, config)
    model.train()
    return model


def dataset() -> Dataset:
    """One global batch of token ids, no padding (every rank's mean loss weighs the same)."""
    ids = torch.randint(3, VOCAB, (WORLD * MICRO, LENGTH), generator=torch.Generator().manual_seed(0)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids, "attention_mask": [[1] * LENGTH] * len(ids)})


def training_args(out: Path, world: int, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=WORLD * MICRO // world,
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_drop_last=True,
        use_cpu=True,  # transformers runs multi-process on the CPU (gloo) only with use_cpu
        seed=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


class FreezeRecorder(TrainerCallback):
    """Placed after SAFE: the step and value of each parameter when it stopped training, all trainable values
    at the last step something froze, and the optimizer (for its state at the end)."""

    def __init__(self, params: dict[str, torch.nn.Parameter]) -> None:
        self.params = params
        self.frozen_at: dict[str, int] = {}
        self.at_freeze: dict[str, torch.Tensor] = {}
        self.at_last_freeze: dict[str, torch.Tensor] = {}
        self.optimizer = None
        self.grad_mismatch: set[str] = set()  # frozen with a gradient, or training without one
        self.block0_input_requires_grad: dict[int, bool] = {}  # per step: does autograd record below block 0?
        self._step = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def pre_hook(module, inputs):
            if module.training and torch.is_grad_enabled():
                self.block0_input_requires_grad[self._step + 1] = bool(inputs[0].requires_grad)

        model.get_base_model().model.layers[0].register_forward_pre_hook(pre_hook)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for name, param in self.params.items():
            if (param.grad is None) == param.requires_grad:
                self.grad_mismatch.add(f"{name} (step {state.global_step + 1})")

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.optimizer = optimizer
        self._step = state.global_step
        new = [n for n, p in self.params.items() if not p.requires_grad and n not in self.frozen_at]
        for name in new:
            self.frozen_at[name] = state.global_step
            self.at_freeze[name] = self.params[name].detach().clone()
        if new:
            self.at_last_freeze = {n: p.detach().clone() for n, p in self.params.items()}


class ReplayFreezes(TrainerCallback):
    """The reference: freeze the named parameters by hand after the given steps' optimizer updates."""

    def __init__(self, plan: dict[int, list[str]]) -> None:
        self.plan = plan

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        names = set(self.plan.get(state.global_step, []))
        for name, param in model.named_parameters():
            if name in names:
                param.requires_grad_(False)
                param.grad = None
                optimizer.optimizer.state.pop(param, None)


def method_args(method: str, out: Path, world: int, **overrides) -> TrainingArguments:
    if method == "neuroada_input":
        overrides = dict(
            gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}, **overrides
        )
    return training_args(out, world, **overrides)


def train(method: str, out: Path, world: int, callbacks: list, **overrides) -> tuple[Trainer, torch.nn.Module]:
    model = build(method)
    trainer = Trainer(
        model=model, args=method_args(method, out, world, **overrides), train_dataset=dataset(), callbacks=callbacks
    )
    trainer.train()
    return trainer, model


def losses(trainer: Trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def optimizer_state_names(optimizer, params: dict[str, torch.nn.Parameter]) -> list[str]:
    state = optimizer.optimizer.state  # accelerate's AcceleratedOptimizer around torch's AdamW
    return sorted(name for name, param in params.items() if param in state and state[param])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--find-unused", choices=("unset", "true", "false"), default="unset")
    args = parser.parse_args()
    overrides = {}
    if args.find_unused != "unset":
        overrides["ddp_find_unused_parameters"] = args.find_unused == "true"

    result: dict = {}
    rank = 0
    for method in args.methods.split(","):
        model = build(method)
        params = trainable(model)
        safe = SAFECallback(**SETTINGS, freeze_from_input_only=method == "neuroada_input")
        recorder = FreezeRecorder(params)
        trainer = Trainer(
            model=model,
            args=method_args(method, args.out / method, WORLD, **overrides),
            train_dataset=dataset(),
            callbacks=[safe, recorder],
        )
        trainer.train()
        rank = trainer.args.process_index
        wrapped = trainer.model_wrapped
        result[method] = {
            "world": trainer.args.world_size,
            "wrapped": type(wrapped).__name__,
            "find_unused_parameters": getattr(wrapped, "find_unused_parameters", None),
            "units": [unit.name for unit in safe.units],
            "block0_input_requires_grad": recorder.block0_input_requires_grad,
            "history": safe.history,
            "freeze_steps": safe.freeze_steps,
            "frozen_at": recorder.frozen_at,
            "optimizer_state": optimizer_state_names(recorder.optimizer, params),
            "grad_mismatch": sorted(recorder.grad_mismatch),
            "probe_input_ids": safe.state()["attributes"]["probe_state"]["input_ids"]["values"],
            "losses": losses(trainer),
        }
        tensors = {
            "at_freeze": recorder.at_freeze,
            "at_last_freeze": recorder.at_last_freeze,
            "final": {n: p.detach().clone() for n, p in params.items()},
        }
        torch.save(tensors, args.out / f"{method}_params_rank{rank}.pt")
        del trainer, model
        torch.distributed.barrier()

    write_rank_results(args.out, rank, result)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

"""The paper's neuron selection: a short fine-tuning through TRL's ``SFTTrainer``, cosine scores, one global budget.

Used by ``neuroada-plugin neft-select`` (:mod:`.cli`). Imports TRL, Transformers and datasets when it runs.
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..kit.fingerprint import weight_fingerprint
from ..merge.errors import OutputExistsError
from .functional import Candidate, cosine_scores, global_selection, resolve_budget
from .selection_file import write_selection

__all__ = ["SelectionRun", "candidate_layers", "select_neurons"]


@dataclass(frozen=True)
class SelectionRun:
    """Everything ``neft-select`` was asked (see its ``--help``)."""

    model: str
    data: str
    output: str
    num_neurons: int | None = None
    neuron_share: float | None = 0.004
    steps: int = 200
    learning_rate: float = 2e-5
    batch_size: int = 4
    max_length: int = 512
    target_modules: tuple[str, ...] = ("up_proj", "down_proj")
    column_modules: tuple[str, ...] = ("down_proj",)
    train: str = "all"
    dtype: str = "float32"
    seed: int = 0
    keep_reference: str | None = None
    force: bool = False
    progress: bool = True


def candidate_layers(
    model: nn.Module, target_modules: tuple[str, ...], column_modules: tuple[str, ...]
) -> dict[str, Candidate]:
    """The model's ``nn.Linear`` layers whose name ends with a target, each with its axis (columns or rows)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(name == t or name.endswith(f".{t}") for t in target_modules):
            axis = "cols" if any(name == c or name.endswith(f".{c}") for c in column_modules) else "rows"
            found[name] = Candidate(name, axis, tuple(module.weight.shape))
    return found


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def select_neurons(run: SelectionRun, log: Callable[[str], None] = print) -> str:
    """Run the selection and write ``run.output``; returns a one-paragraph summary."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    output = Path(run.output)
    if output.exists() and not run.force:
        raise OutputExistsError(f"{output} exists; pass --force to replace it.")
    if run.steps < 1 or run.batch_size < 1 or run.max_length < 1:
        raise ValueError("--steps, --batch-size and --max-length must be positive.")
    if not Path(run.data).is_file():
        raise ValueError(f"--data {run.data}: no such file (a JSON/JSONL file of training rows is expected).")

    tokenizer = AutoTokenizer.from_pretrained(run.model)
    # float32 master weights: at the paper's lr most AdamW steps are below bf16 resolution, so bf16/fp16 run
    # as mixed precision (autocast), as the paper's bf16 training did, never as low-precision weights.
    model = AutoModelForCausalLM.from_pretrained(run.model, dtype=torch.float32)
    candidates = candidate_layers(model, run.target_modules, run.column_modules)
    if not candidates:
        raise ValueError(
            f"--model {run.model} has no nn.Linear layer named {' / '.join(run.target_modules)}: set --target-modules."
        )
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    neurons, parameters = resolve_budget(
        list(candidates.values()), num_neurons=run.num_neurons, neuron_share=run.neuron_share, total_parameters=total
    )
    modules = dict(model.named_modules())
    original = {name: modules[name].weight.detach().to("cpu", copy=True) for name in candidates}
    fingerprints = {name: weight_fingerprint(weight).tolist() for name, weight in original.items()}
    if run.train == "candidates":
        model.requires_grad_(False)
        for name in candidates:
            modules[name].weight.requires_grad_(True)

    dataset = load_dataset("json", data_files=run.data, split="train")
    log(
        f"neft-select: {len(candidates)} candidate layers, {sum(c.count for c in candidates.values()):,} neurons; "
        f"reference run: {run.steps} steps on {len(dataset)} rows, training {run.train} parameters"
    )
    with tempfile.TemporaryDirectory(prefix="neft-select-") as scratch:
        args = SFTConfig(
            output_dir=scratch,
            max_steps=run.steps,
            learning_rate=run.learning_rate,
            per_device_train_batch_size=run.batch_size,
            max_length=run.max_length,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            logging_steps=max(1, run.steps // 10),
            save_strategy="no",
            report_to="none",
            seed=run.seed,
            bf16=run.dtype == "bfloat16",
            fp16=run.dtype == "float16",
            disable_tqdm=not run.progress,
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        device = trainer.args.device
        started = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - started
        peak = _peak_memory_bytes(device)
        state = trainer.accelerator.get_state_dict(trainer.model)  # gathered on the main process (DDP, FSDP, ZeRO-3)
        if not trainer.accelerator.is_main_process:
            return "neft-select: selection written by the main process."
        if run.keep_reference:
            trainer.save_model(run.keep_reference)

    scores = {
        name: cosine_scores(original[name], state[f"{name}.weight"], c.axis) for name, c in candidates.items()
    }
    chosen = global_selection(list(candidates.values()), scores, neurons=neurons, parameters=parameters)
    selected = sum(int(index.numel()) for index in chosen.values())
    selected_params = sum(int(chosen[n].numel()) * c.neuron_size for n, c in candidates.items())
    threshold = max((float(scores[n][chosen[n]].max()) for n in chosen if chosen[n].numel()), default=None)
    entries = {
        name: {
            "axis": c.axis,
            "shape": list(c.shape),
            "fingerprint": fingerprints[name],
            "neurons": chosen[name].tolist(),
        }
        for name, c in candidates.items()
    }
    meta = {
        "model": run.model,
        "criterion": "cosine similarity between original and briefly fine-tuned weights (lowest selected)",
        "budget": {
            "requested_neurons": run.num_neurons,
            "requested_share": run.neuron_share,
            "neurons": selected,
            "parameters": selected_params,
            "share_of_parameters": selected_params / total,
            "total_parameters": total,
            "highest_selected_score": threshold,
        },
        "reference_run": {
            "data": str(run.data),
            "rows": len(dataset),
            "steps": run.steps,
            "learning_rate": run.learning_rate,
            "batch_size": run.batch_size,
            "max_length": run.max_length,
            "trained": run.train,
            "dtype": run.dtype,
            "seed": run.seed,
            "final_loss": float(result.training_loss),
            "seconds": round(seconds, 3),
            "peak_memory_bytes": peak,
            "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
            "device": str(device),
        },
        "command": " ".join(sys.argv),
    }
    write_selection(output, entries, meta)
    per_layer = sorted(((int(chosen[n].numel()), n) for n in chosen), reverse=True)[:3]
    return (
        f"neft-select: {selected:,} neurons ({selected_params:,} parameters, {100 * selected_params / total:.3f}% of "
        f"the model) over {sum(1 for n in chosen if chosen[n].numel())} of {len(chosen)} layers -> {output}\n"
        f"  reference run: {run.steps} steps in {seconds:.1f} s, peak memory {peak / 2**30:.2f} GiB, final loss "
        f"{result.training_loss:.4f}; most neurons in {', '.join(f'{n} ({k})' for k, n in per_layer)}"
    )

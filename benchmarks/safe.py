"""SAFE (selective adapter freezing) against the same training without it: memory, time and accuracy in one run.

For NeuroAda k=1 and LoRA r=8, each with and without ``SAFECallback``, in a fresh process per run:
TRL ``SFTTrainer`` with the accuracy benchmark's protocol (``benchmarks/accuracy.py``: the
``examples/trl/sft.py`` recipe on SmolLM2-135M, PIQA, 32 steps x 8, the learning rate that
benchmark chose for the method), then held-out accuracy on its 200 questions. SAFE variants:
``safe`` (the callback's defaults) and ``safe_input`` (``freeze_from_input_only=True``: freezing
starts at the input side, so every freeze also stops autograd below it).

Measured after freezing, i.e. over the steps after SAFE's schedule ends (the same steps in the
runs without SAFE): peak memory (CPU: VmHWM after clear_refs of the run's own process; CUDA:
``max_memory_allocated``) and the median step time; plus the units frozen and the adapter
parameters still training. Accuracy's standard error is the binomial one of the held-out count.

    python benchmarks/safe.py                 # SmolLM2-135M, 2 methods x 3 variants
    python benchmarks/safe.py --quick         # smoke run: tiny random Llama, 6 steps, 8 questions
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _measure import (
    PeakMemory,
    forkserver_context,
    git_state,
    loadavg,
    machine_info,
    markdown_header,
    resolve_device,
    run_isolated,
    utc_timestamp,
    write_results,
)

from harness import commonsense

REPO_ROOT = Path(__file__).resolve().parent.parent
METHODS = {"neuroada_k1": "NeuroAda k=1", "lora_r8": "LoRA r=8"}
VARIANTS = {"none": {}, "safe": {}, "safe_input": {"freeze_from_input_only": True}}
CHOSEN_LR = {"neuroada_k1": 1e-2, "lora_r8": 1e-2}  # benchmarks/results/accuracy-piqa.md, chosen on validation


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one (method, variant) and score it; memory and step times over the post-freeze steps."""
    import accuracy
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from harness.training import CommonsenseArguments, load_model_and_tokenizer
    from neuroada_plugin import SAFECallback, SAFEConfig

    accuracy.quiet_libraries()
    settings = accuracy.Settings(**job["settings"])
    method = accuracy.METHODS[job["method"]]
    model, tokenizer = load_model_and_tokenizer(
        CommonsenseArguments(model_name_or_path=settings.model_path, dtype=settings.dtype)
    )
    train, _, heldout = accuracy.run_data(settings, seed=0)
    safe_config = SAFEConfig(**VARIANTS[job["variant"]])
    phase_start = safe_config.schedule(settings.steps).freeze_end_step  # steps after this one are measured
    memory = PeakMemory(resolve_device("auto"))

    class PostFreezeMeter(TrainerCallback):
        def __init__(self) -> None:
            self.step_s: list[float] = []
            self.peak: int | None = None
            self._began = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == phase_start:
                memory.start()
            self._began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step > phase_start:
                self.step_s.append(time.perf_counter() - self._began)

        def on_train_end(self, args, state, control, **kwargs):
            self.peak = memory.stop()

    meter = PostFreezeMeter()
    safe = SAFECallback(safe_config) if job["variant"] != "none" else None
    with tempfile.TemporaryDirectory(prefix="safe-bench-") as output_dir:
        config = SFTConfig(
            output_dir=output_dir, **settings.training, learning_rate=job["lr"], max_steps=settings.steps, seed=0
        )
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=Dataset.from_list(commonsense.sft_rows(train, commonsense.CLOZE)),
            processing_class=tokenizer,
            peft_config=accuracy.peft_config(method, model),
            callbacks=[cb for cb in (safe, meter) if cb is not None],  # the meter last: after SAFE's freezes
        )
        trainer.remove_callback(PrinterCallback)
        started = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - started
        model = trainer.model
    score = accuracy._score(model, tokenizer, heldout, settings)
    trainable_after = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "method": job["method"],
        "variant": job["variant"],
        "lr": job["lr"],
        "post_freeze_from_step": phase_start + 1,
        "post_freeze_peak_bytes": meter.peak,
        "post_freeze_step_s": statistics.median(meter.step_s) if meter.step_s else None,
        "memory_method": memory.method,
        "train_s": train_s,
        "units": len(safe.units) if safe else None,
        "frozen_units": len(safe.freeze_steps) if safe else 0,
        "freeze_steps": dict(safe.freeze_steps) if safe else {},
        "trainable_after": trainable_after,
        "heldout_accuracy": score["accuracy"],
        "heldout_n": score["n"],
    }


def _se(accuracy_value: float, n: int) -> float:
    return math.sqrt(accuracy_value * (1 - accuracy_value) / n) if n else float("nan")


def markdown_report(payload: dict[str, Any]) -> list[str]:
    lines = markdown_header(payload, "SAFE vs the same training without it")
    lines += [
        "",
        f"Protocol: {payload['protocol']}",
        "",
        "| method | SAFE | frozen units | adapter params training at the end | post-freeze peak memory | / without | "
        "post-freeze median step s | / without | held-out acc ± SE | Δ acc vs without |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = payload["runs"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {METHODS[row['method']]} | {row['variant']} | error: {row['error']} |")
            continue
        base = next(
            (r for r in rows if r["method"] == row["method"] and r["variant"] == "none" and "error" not in r), None
        )
        mem, step = row["post_freeze_peak_bytes"], row["post_freeze_step_s"]
        mem_ratio = f"{mem / base['post_freeze_peak_bytes']:.3f}" if base and mem else "-"
        step_ratio = f"{step / base['post_freeze_step_s']:.3f}" if base and step else "-"
        acc = row["heldout_accuracy"]
        delta = f"{acc - base['heldout_accuracy']:+.3f}" if base else "-"
        units = f"{row['frozen_units']}/{row['units']}" if row["units"] else "-"
        lines.append(
            f"| {METHODS[row['method']]} | {row['variant']} | {units} | {row['trainable_after']:,} | "
            f"{mem / 2**30:.3f} GiB | {mem_ratio} | {step:.2f} | {step_ratio} | "
            f"{acc:.3f} ± {_se(acc, row['heldout_n']):.3f} | {delta} |"
        )
    lines += [
        "",
        "Verdict (target: memory and step time after freezing lower, accuracy not lower than without SAFE by more "
        "than one SE; a run that froze nothing trained exactly as the one without SAFE, so its ratios show the "
        "callback's own cost and the run-to-run noise of this machine):",
        "",
    ]
    for row in rows:
        base = next((r for r in rows if r["method"] == row["method"] and r["variant"] == "none"), None)
        if row["variant"] == "none" or base is None or "error" in row or "error" in base:
            continue
        lower_mem = row["post_freeze_peak_bytes"] < base["post_freeze_peak_bytes"]
        lower_step = row["post_freeze_step_s"] < base["post_freeze_step_s"]
        within = base["heldout_accuracy"] - row["heldout_accuracy"] <= _se(base["heldout_accuracy"], base["heldout_n"])
        froze = row["frozen_units"] > 0
        verdict = ("PASS" if lower_mem and lower_step and within else "MISS") if froze else "nothing frozen (control)"
        lines.append(
            f"- {METHODS[row['method']]} {row['variant']}: froze {row['frozen_units']} units, memory lower {lower_mem}, "
            f"step time lower {lower_step}, accuracy at most one SE lower {within}: {verdict}"
        )
    return lines + [""]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny random Llama, 6 steps, 8 questions")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per run")
    args = parser.parse_args(argv)

    import accuracy

    started = time.perf_counter()
    loadavg_start = loadavg()
    with tempfile.TemporaryDirectory(prefix="safe-quick-model-") as scratch:
        model_path = str(accuracy.build_quick_model(Path(scratch))) if args.quick else None
        accuracy_args = accuracy.parse_args(["--quick", "--steps", "6"] if args.quick else [])
        settings, _ = accuracy.resolve_settings(accuracy_args, model_path)
        context = forkserver_context(["torch", "transformers", "trl", "peft"])
        runs = []
        for method in args.methods:
            for variant in args.variants:
                job = {
                    "settings": dataclasses.asdict(settings),
                    "method": method,
                    "variant": variant,
                    "lr": CHOSEN_LR[method],
                }
                print(f"{method} / {variant} ...", flush=True)
                message = run_isolated(context, run_one, job, args.timeout)
                runs.append(message["result"] if message["ok"] else {**job, "error": message["error"]})
                print(json.dumps({k: v for k, v in runs[-1].items() if k != "settings"}), flush=True)
    payload = {
        "command": "python benchmarks/safe.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "timestamp": utc_timestamp(),
        "machine": machine_info(resolve_device("auto")),
        "git": git_state(),
        "loadavg_start": loadavg_start,
        "loadavg_end": loadavg(),
        "memory_methods": sorted({r.get("memory_method", "") for r in runs if r.get("memory_method")}),
        "wall_s": time.perf_counter() - started,
        "protocol": (
            f"{settings.model_id}, {settings.sources}, {settings.steps} steps x batch {settings.batch_size}, "
            f"held-out {settings.heldout_size} questions, seed 0, SAFE defaults (warm-up 10%, schedule end 50% "
            "of max_steps, max_threshold 0.5, max_frozen_fraction 0.75, block units, 'disabled' CKA reading)"
        ),
        "settings": dataclasses.asdict(settings),
        "runs": runs,
    }
    stem = "safe-quick" if args.quick else f"safe-{settings.sources.replace(',', '-')}"
    json_path, md_path = write_results(payload, args.output_dir, stem, markdown_report(payload))
    print("\n".join(markdown_report(payload)))
    print(f"wrote {json_path} and {md_path}")
    return payload


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main()

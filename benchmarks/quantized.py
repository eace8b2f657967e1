"""QLoRA-style training memory and step time: NeuroAda k=1 vs LoRA r=8 on a 4-bit (NF4) base, next to fp32.

    .venv/bin/python benchmarks/quantized.py            # SmolLM2-135M + Llama-2-7B-shaped 2-layer model
    .venv/bin/python benchmarks/quantized.py --quick    # tiny stand-ins, < 1 min (smoke run)

Every (model, base, method) runs in a fresh process (efficiency.py's forkserver machinery): load the
model in fp32, for ``nf4`` replace the attention/MLP projections by ``bitsandbytes.nn.Linear4bit``
(NF4, double quantization, compute fp32; ``lm_head`` and embeddings stay fp32, as transformers'
``load_in_4bit`` leaves them), apply the method (every registered method whose spec lists
``bnb_4bit`` in ``quantized_layers``, with its default config; LoRA r=8; the frozen-backward
floor), one warm-up step (creates the AdamW state), then
one step under the peak-memory probe and ``--steps`` timed steps (median). Memory: peak RSS
(``VmHWM``) on CPU, ``torch.cuda.max_memory_allocated`` on a GPU. "model + adapter" = memory held by the
model and adapter above the process's baseline (interpreter + libraries) before the first step
(weights: 4-bit packed + fp32 embeddings/head); "step peak" = the peak during a steady-state
training step (forward, backward, AdamW, with the optimizer state alive) above that. The frozen-backward floor (nothing trainable,
backward through every layer) is what any adapter pays; "added" = peak minus that floor.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _measure import (
    MIB,
    MethodRow,
    PeakMemory,
    forkserver_context,
    git_state,
    glibc_trim,
    loadavg,
    machine_info,
    make_allocator_transparent,
    markdown_header,
    method_rows,
    resolve_device,
    run_isolated,
    sync,
    utc_timestamp,
    version,
    write_results,
)
from efficiency import FULL_MODELS, QUICK_MODELS, TARGET_MODULES, ModelSpec, load_model, train_step
from torch import nn

BASES = ("fp32", "nf4")


def quantized_rows() -> dict[str, MethodRow]:
    """The registered methods that adapt a bitsandbytes 4-bit base (spec flag), each with its default config."""
    return {row.key: row for row in method_rows(where=lambda spec: "bnb_4bit" in spec.quantized_layers)}


def labels() -> dict[str, str]:
    """Every compared row and its label, in report order: the floor, the registered methods, LoRA r=8."""
    registered = {key: row.label for key, row in quantized_rows().items()}
    return {"frozen_backward": "frozen backward (floor)", **registered, "lora_r8": "LoRA r=8"}


def quantize_projections(model: nn.Module) -> int:
    """Replace the attention/MLP ``nn.Linear`` layers by NF4 ``Linear4bit`` in place; returns how many."""
    import bitsandbytes as bnb

    count = 0
    for name, module in list(model.named_modules()):
        if not (isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGET_MODULES):
            continue
        quantized = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=torch.float32,
            compress_statistics=True,
            quant_type="nf4",
            device="meta",
        )
        quantized.weight = bnb.nn.Params4bit(
            module.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True
        )
        if module.bias is not None:
            quantized.bias = nn.Parameter(module.bias.data, requires_grad=False)
        quantized = quantized.to(module.weight.device)  # quantizes
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, quantized)
        del module
        count += 1
    return count


def apply_method(method: str, model: nn.Module) -> tuple[nn.Module, list[nn.Parameter]]:
    import peft

    if method == "frozen_backward":
        model.requires_grad_(False)
        model.enable_input_require_grads()
        return model, []
    if method in quantized_rows():
        config: Any = quantized_rows()[method].config(target_modules=list(TARGET_MODULES))
    elif method == "lora_r8":
        config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(TARGET_MODULES))
    else:
        raise ValueError(method)
    model = peft.get_peft_model(model, config)
    return model, [p for p in model.parameters() if p.requires_grad]


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """In a fresh child: load, quantize (nf4), apply the method, warm up, measure one step's peak, time steps."""
    device = torch.device(job["device"])
    spec = ModelSpec(**job["spec"])
    if device.type == "cpu":
        make_allocator_transparent()
    baseline = PeakMemory(device).current()  # the interpreter and libraries, before any weight
    torch.manual_seed(0)
    model = load_model(spec, job["checkpoint_dir"], device, torch.float32)
    quantized_layers = quantize_projections(model) if job["base"] == "nf4" else 0
    model, trainable = apply_method(job["method"], model)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    input_ids = torch.randint(0, model.config.vocab_size, (spec.batch, spec.seq), device=device)
    gc.collect()
    sync(device)
    glibc_trim()
    probe = PeakMemory(device)
    loaded = probe.current()
    train_step(model, optimizer, input_ids)  # warm-up; creates the AdamW state
    gc.collect()
    sync(device)
    glibc_trim()
    before = probe.start()
    train_step(model, optimizer, input_ids)
    peak = probe.stop()
    times = []
    for _ in range(job["steps"]):
        sync(device)
        start = time.perf_counter()
        train_step(model, optimizer, input_ids)
        sync(device)
        times.append(time.perf_counter() - start)
    return {
        "baseline_bytes": baseline,
        "loaded_bytes": loaded,
        "before_step_bytes": before,
        "peak_bytes": peak,
        "step_peak_over_loaded_bytes": peak - loaded,
        "step_s": statistics.median(times),
        "step_s_all": times,
        "trainable": sum(p.numel() for p in trainable),
        "quantized_layers": quantized_layers,
        "memory_method": probe.method,
    }


def results_table(rows: list[dict[str, Any]], label: str) -> list[str]:
    names = labels()
    floors = {r["base"]: r["result"]["peak_bytes"] for r in rows if r["method"] == "frozen_backward" and r["ok"]}
    lines = [
        f"### {label}",
        "",
        "| base | method | trainable | model + adapter MiB | step peak over them MiB | peak MiB (process) "
        "| added over floor MiB | step s (median) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if not row["ok"]:
            lines.append(f"| {row['base']} | {names[row['method']]} | failed: {row['error']} | | | | | |")
            continue
        r = row["result"]
        floor = floors.get(row["base"])
        added = "-" if floor is None else f"{(r['peak_bytes'] - floor) / MIB:,.0f}"
        lines.append(
            f"| {row['base']} | {names[row['method']]} | {r['trainable']:,} | "
            f"{(r['loaded_bytes'] - r['baseline_bytes']) / MIB:,.0f} | {r['step_peak_over_loaded_bytes'] / MIB:,.0f} | "
            f"{r['peak_bytes'] / MIB:,.0f} | {added} | {r['step_s']:.2f} |"
        )
    return lines + [""]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny stand-in models, 1 timed step (smoke run)")
    parser.add_argument("--models", nargs="*", choices=[s.key for s in FULL_MODELS], help="default: all")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 3; quick 1)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    git_at_start = git_state()
    device = resolve_device(args.device)
    steps = args.steps if args.steps is not None else (1 if args.quick else 3)
    models = [s for s in (QUICK_MODELS if args.quick else FULL_MODELS) if not args.models or s.key in args.models]
    checkpoint_dirs: dict[str, str | None] = {}
    for spec in models:
        if spec.checkpoint == "smollm2":
            from harness.models import smollm2_checkpoint

            checkpoint_dirs[spec.key] = str(smollm2_checkpoint())
        else:
            checkpoint_dirs[spec.key] = None
    context = forkserver_context(["torch", "transformers", "peft", "bitsandbytes", "neuroada_plugin"])
    load_start = loadavg()
    payload: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/quantized.py", *(argv if argv is not None else sys.argv[1:])]),
        "timestamp": utc_timestamp(),
        "machine": {**machine_info(device), "bitsandbytes": version("bitsandbytes")},
        "git": git_at_start,
        "loadavg_start": load_start,
        "device": str(device),
        "steps": steps,
        "models": {},
    }
    for spec in models:
        rows = []
        for base in BASES:
            for method in labels():
                job = {
                    "device": str(device),
                    "spec": dataclasses.asdict(spec),
                    "checkpoint_dir": checkpoint_dirs[spec.key],
                    "base": base,
                    "method": method,
                    "steps": steps,
                }
                message = run_isolated(context, run_one, job, args.timeout)
                row = {"base": base, "method": method, "ok": message["ok"], "loadavg": loadavg()}
                row["result" if message["ok"] else "error"] = message.get("result", message.get("error"))
                rows.append(row)
                shown = (
                    f"peak {row['result']['peak_bytes'] / MIB:,.0f} MiB, step {row['result']['step_s']:.2f} s"
                    if row["ok"]
                    else row["error"]
                )
                print(f"[{spec.key}] {base} {method}: {shown}", flush=True)
        payload["models"][spec.key] = {"label": spec.label, "batch": spec.batch, "seq": spec.seq, "rows": rows}
    payload["loadavg_end"] = loadavg()
    payload["wall_s"] = time.perf_counter() - started
    payload["memory_methods"] = sorted(
        {r["result"]["memory_method"] for m in payload["models"].values() for r in m["rows"] if r["ok"]}
    )
    payload["machine"]["python"] = payload["machine"].get("python")
    compared = ", ".join(row.label for row in quantized_rows().values())
    lines = markdown_header(payload, f"QLoRA-style training: {compared} vs LoRA r=8 on a 4-bit (NF4) base")
    lines += [f"- bitsandbytes: {payload['machine']['bitsandbytes']}; timed steps per configuration: {steps}", ""]
    for model in payload["models"].values():
        lines += results_table(model["rows"], f"{model['label']} ({model['batch']} x {model['seq']} tokens)")
    stem = f"quantized-{device.type}" + ("-quick" if args.quick else "")
    json_path, md_path = write_results(payload, args.output_dir, stem, lines)
    print("\n".join(lines))
    print(f"wrote {json_path} and {md_path}")
    return payload


if __name__ == "__main__":
    main()

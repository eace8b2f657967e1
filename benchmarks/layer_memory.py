"""Peak training memory and step time of ONE adapted linear layer: NeuroAda vs LoRA vs dense composition.

Issue 2, item 9. Every configuration trains the same frozen ``nn.Linear`` for a few steps
(forward, backward with an upstream gradient, AdamW step on the trainable tensors; the input
requires grad, as it does inside a network, so ``dL/dx`` is always computed):

* ``frozen``          the bare layer, nothing trainable: the floor every adapter is compared to
* ``neuroada_k1/k20`` our layer (``peft.get_peft_model`` with ``NeuroAdaConfig(top_k=k)``)
* ``lora_r8``         PEFT LoRA, r=8, alpha=16, no dropout
* ``dense_k1``        the official NeuroAda code's forward, written here: ``W + scatter(idx, theta)``
                      then ``F.linear``, with the same ``select_connections`` indices as our layer
* ``supertuning_k1``  PEFT Super-Tuning (magnitude top-k over the whole matrix) with exactly
                      ``out`` trainable entries, the budget of NeuroAda k=1
* ``*_previous``      (``--previous-op``) our layer running the ``sparse_bypass`` from before
                      commit 802f841 (kept below), for a before/after comparison in one run

Memory: each configuration runs alone in a FRESH process. On CPU the only honest memory
signal is the resident set size, and RSS remembers everything a process ever did
(freed-but-cached glibc arenas, a bigger earlier configuration). Children are forked from a
``forkserver`` that has imported torch and peft but never allocated a tensor, so each starts
from the same clean state without paying the ~10 s import again.

* CUDA: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` just before the steps.
* CPU: after one warm-up step (thread pools, lazy library buffers), the optimizer state and
  gradients are dropped, glibc is told to serve every allocation above 64 KiB with its own
  mmap (``mallopt(M_MMAP_THRESHOLD)``: freed tensors then really leave the process, so RSS
  tracks live tensors instead of allocator caching), ``malloc_trim(0)`` returns cached pages,
  the kernel's peak-RSS counter is reset (``/proc/self/clear_refs`` <- ``5``) and the peak of
  ``VmHWM`` over the measured steps minus ``VmRSS`` before them is the step peak. It includes
  gradients, AdamW state (created inside the measured steps), activations kept for backward
  and every temporary. Where ``clear_refs`` is unavailable a psutil sampling thread is used
  instead (less exact: it can miss short spikes); the method is recorded.
* ``held fwd->bwd``: memory alive right after the forward (output + what autograd saved). A
  network holds this for every layer at once, so this is the part that scales with depth
  (the dense reference's weight copy lives here); the rest of the step peak is transient.
* ``over frozen`` = the same quantity minus the bare frozen layer's: what the adapter adds.
  ``adapter state`` (theta + indices, LoRA A/B, ...) is counted from the module.

Time: all configurations of one shape run in ONE fresh process, interleaved step by step
with a rotating order, so that load from other processes (the machine is shared) hits all of
them alike; median and min wall-clock per step after ``warmup`` steps, plus the median
process CPU time per step (less sensitive to other load). Default allocator settings.

Run ``python benchmarks/layer_memory.py [--previous-op]`` (full run; on 2 CPU cores about
10 minutes when quiet, ~16 under a load average of 8; the 4096-token shape dominates) or
``--quick`` (smoke run, small shapes, ~30 s). ``--device auto|cpu|cuda``, ``--dtype
float32|bfloat16``. Results go to ``benchmarks/results/layer_memory-<device>-<dtype>[-quick].{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
for _path in (REPO_ROOT, REPO_ROOT / "benchmarks"):  # run as a script from anywhere, also in forkserver children
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402
from _measure import (  # noqa: E402
    MIB,
    DenseComposition,
    PeakMemory,
    forkserver_context,
    git_state,
    loadavg,
    machine_info,
    make_allocator_transparent,
    markdown_header,
    mib,
    ratio,
    resolve_device,
    run_isolated,
    supertuning_sparsity,
    sync,
    utc_timestamp,
    write_results,
)
from torch import nn  # noqa: E402

# Issue 2 targets for NeuroAda k=1.
TIME_RATIO_TARGET = 1.15  # step time <= 1.15 x LoRA r=8
DENSE_FRACTION_TARGET = 0.5  # "well under" the dense reference: at most half its extra memory


@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmarked layer: weight [out, in], input [batch, seq, in], and how long to measure it."""

    name: str
    in_features: int
    out_features: int
    batch: int
    seq: int
    warmup: int
    reps: int
    mem_steps: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def label(self) -> str:
        return f"{self.name} {self.in_features}->{self.out_features}, {self.batch}x{self.seq} tok"


# Full run: a LLaMA-7B attention projection with a realistic micro-batch (matmul-bound), and the
# two MLP shapes with 16 tokens (weight-bound: here a dense weight copy dominates everything).
FULL_SHAPES = (
    Shape("attn", 4096, 4096, 8, 512, warmup=1, reps=3, mem_steps=1),
    Shape("mlp_up", 4096, 11008, 1, 16, warmup=3, reps=15, mem_steps=2),
    Shape("mlp_down", 11008, 4096, 1, 16, warmup=3, reps=15, mem_steps=2),
)
QUICK_SHAPES = (
    Shape("attn", 512, 512, 2, 128, warmup=1, reps=2, mem_steps=1),
    Shape("mlp_up", 512, 1376, 1, 32, warmup=1, reps=2, mem_steps=1),
)

BASE_CONFIGS = ("frozen", "neuroada_k1", "neuroada_k20", "lora_r8", "dense_k1", "supertuning_k1")
PREVIOUS_CONFIGS = ("neuroada_k1_previous", "neuroada_k20_previous")
OPTIONAL_CONFIGS = ("dense_k20",)
ALL_CONFIGS = BASE_CONFIGS + PREVIOUS_CONFIGS + OPTIONAL_CONFIGS


# --------------------------------------------------------------------------------------------
# The previous sparse_bypass (before commit 802f841), kept to measure before/after (--previous-op)
# --------------------------------------------------------------------------------------------

# Its chunk bound: [tokens, out, chunk] temporaries of up to 2**24 elements, three at a time.
PREVIOUS_CHUNK_ELEMENTS = 1 << 24


class PreviousSparseBypass(torch.autograd.Function):
    """``functional.SparseBypass`` as it was before 802f841, for the before/after rows.

    Per block of connection columns it allocated zeros, a gather, a product and a sum
    (forward) and a gather, a product and a contribution (backward), and returned dL/dx as a
    view (so autograd could not accumulate the frozen path's dL/dx into it in place). The
    current op keeps the math and removes those allocations; see ``functional.py``.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, theta: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        out_features, k = indices.shape
        compute_dtype = torch.promote_types(x.dtype, theta.dtype)
        x2d = x.reshape(-1, x.shape[-1])
        theta_c = theta.to(compute_dtype)
        delta = torch.zeros(x2d.shape[0], out_features, dtype=compute_dtype, device=x.device)
        step = _previous_step(x2d.shape[0], out_features, k)
        for start in range(0, k, step):
            stop = min(k, start + step)
            gathered = _previous_gather(x2d, indices[:, start:stop]).to(compute_dtype)
            delta += (gathered * theta_c[:, start:stop]).sum(-1)
            del gathered
        ctx.save_for_backward(x, theta, indices)
        return delta.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx: Any, grad_delta: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, theta, indices = ctx.saved_tensors
        out_features, k = indices.shape
        compute_dtype = torch.promote_types(x.dtype, theta.dtype)
        x2d = x.reshape(-1, x.shape[-1])
        g = grad_delta.reshape(-1, out_features).to(compute_dtype)
        want_x, want_theta = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_theta = torch.empty(out_features, k, dtype=compute_dtype, device=x.device) if want_theta else None
        grad_x = torch.zeros(x2d.shape, dtype=compute_dtype, device=x.device) if want_x else None
        theta_c = theta.to(compute_dtype)
        step = _previous_step(x2d.shape[0], out_features, k)
        for start in range(0, k, step):
            stop = min(k, start + step)
            columns = indices[:, start:stop]
            if want_theta:
                gathered = _previous_gather(x2d, columns).to(compute_dtype)
                grad_theta[:, start:stop] = (gathered * g.unsqueeze(-1)).sum(0)
                del gathered
            if want_x:
                contribution = g.unsqueeze(-1) * theta_c[:, start:stop]
                grad_x.index_add_(1, columns.reshape(-1), contribution.view(x2d.shape[0], -1))
                del contribution
        if grad_x is not None:
            grad_x = grad_x.view(x.shape).to(x.dtype)
        if grad_theta is not None:
            grad_theta = grad_theta.to(theta.dtype)
        return grad_x, grad_theta, None


def _previous_gather(x2d: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    out_features, chunk = columns.shape
    return x2d.index_select(1, columns.reshape(-1)).view(x2d.shape[0], out_features, chunk)


def _previous_step(tokens: int, out_features: int, k: int) -> int:
    return max(1, min(k, PREVIOUS_CHUNK_ELEMENTS // max(1, tokens * out_features)))


def previous_sparse_bypass(x: torch.Tensor, theta: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Drop-in for ``functional.sparse_bypass`` using :class:`PreviousSparseBypass`."""
    return PreviousSparseBypass.apply(x, theta, indices)


def check_previous_matches_current() -> float:
    """Max abs difference (fp64) between the previous and current op: forward, dL/dx, dL/dtheta.

    Covers k=1, k>1, rows that share an input column (duplicates exercise ``index_add_``) and,
    with tiny chunk bounds, the multi-block paths of both ops. A large value means the two
    rows of a before/after pair do not compute the same thing.
    """
    from neuroada_plugin import select_connections
    from neuroada_plugin.neuroada import functional

    worst = 0.0
    saved_chunk = functional._CHUNK_ELEMENTS
    try:
        for chunk in (saved_chunk, 50, 7, 1):
            functional._CHUNK_ELEMENTS = chunk
            gen = torch.Generator().manual_seed(chunk)
            for lead, out_features, in_features, k in [((3, 5), 7, 6, 1), ((4,), 9, 5, 3), ((2, 2, 3), 6, 11, 11)]:
                weight = torch.randn(out_features, in_features, generator=gen, dtype=torch.float64)
                weight[:, 0] = 100.0  # every row picks column 0: duplicate indices
                indices = select_connections(weight, k)
                x = torch.randn(*lead, in_features, generator=gen, dtype=torch.float64)
                theta = torch.randn(out_features, k, generator=gen, dtype=torch.float64)
                upstream = torch.randn(*lead, out_features, generator=gen, dtype=torch.float64)
                results = []
                for fn in (functional.sparse_bypass, previous_sparse_bypass):
                    xr, tr = x.clone().requires_grad_(), theta.clone().requires_grad_()
                    y = fn(xr, tr, indices)
                    y.backward(upstream)
                    results.append((y.detach(), xr.grad, tr.grad))
                for a, b in zip(*results, strict=True):
                    worst = max(worst, (a - b).abs().max().item())
    finally:
        functional._CHUNK_ELEMENTS = saved_chunk
    return worst


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class OneLayer(nn.Module):
    """A model that is just ``proj``: the unit PEFT's ``target_modules=["proj"]`` adapts."""

    def __init__(self, proj: nn.Linear) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def build_model(config: str, shape: Shape, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The model for ``config``: a fresh frozen linear (seeded, so every config sees the same W) plus its adapter."""
    import peft

    from neuroada_plugin import NeuroAdaConfig

    torch.manual_seed(0)
    linear = nn.Linear(shape.in_features, shape.out_features, bias=False, device=device, dtype=dtype)
    linear.requires_grad_(False)
    model = OneLayer(linear)
    if config == "frozen":
        return model
    if config.startswith("neuroada_k"):
        k = int(config.removeprefix("neuroada_k").removesuffix("_previous"))
        return peft.get_peft_model(model, NeuroAdaConfig(top_k=k, target_modules=["proj"]))
    if config == "lora_r8":
        return peft.get_peft_model(
            model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["proj"])
        )
    if config.startswith("dense_k"):
        return DenseComposition(linear, int(config.removeprefix("dense_k")))
    if config == "supertuning_k1":
        sparsity = supertuning_sparsity(shape.out_features, shape.in_features)
        return peft.get_peft_model(model, peft.SupertuningConfig(sparsity=sparsity, target_modules=["proj"]))
    raise ValueError(f"unknown configuration {config!r}; known: {ALL_CONFIGS}")


def adapter_state_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer that is not the frozen base weight/bias."""
    total = 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name.endswith(("proj.weight", "proj.bias", "base_layer.weight", "base_layer.bias")):
            continue
        total += tensor.numel() * tensor.element_size()
    return total


# --------------------------------------------------------------------------------------------
# Workers (each runs in a fresh forkserver child)
# --------------------------------------------------------------------------------------------

# Which op the NeuroAda layers of the current step use (the "_previous" configurations share
# the timing process with the plain ones, so the switch is per step, not per process).
_USE_PREVIOUS = {"on": False}


def _install_bypass_switch() -> None:
    """Route our layer's ``sparse_bypass`` through :data:`_USE_PREVIOUS` (this process only)."""
    import neuroada_plugin.neuroada.layer as layer_module

    current = layer_module.sparse_bypass
    if getattr(current, "_benchmark_switch", False):
        return

    def switched(x: torch.Tensor, theta: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return (previous_sparse_bypass if _USE_PREVIOUS["on"] else current)(x, theta, indices)

    switched._benchmark_switch = True  # type: ignore[attr-defined]
    layer_module.sparse_bypass = switched


@dataclasses.dataclass
class Case:
    """One configuration ready to train: model, optimizer, input (requires grad) and upstream gradient."""

    config: str
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    trainable: list[nn.Parameter]
    x: torch.Tensor
    grad_out: torch.Tensor
    build_s: float

    def step(self, after_forward: Callable[[], None] | None = None) -> None:
        """Forward, backward of ``grad_out`` (reaches ``x``, as inside a network), optimizer step."""
        _USE_PREVIOUS["on"] = self.config.endswith("_previous")
        y = self.model(self.x)
        if after_forward is not None:
            after_forward()
        y.backward(self.grad_out)
        del y
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.x.grad = None


def build_case(config: str, shape: Shape, device: torch.device, dtype: torch.dtype) -> Case:
    """Build ``config`` for ``shape``; the input and upstream gradient are seeded, identical for all."""
    if config.endswith("_previous"):
        _install_bypass_switch()
    start = time.perf_counter()
    model = build_model(config, shape, device, dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3) if trainable else None
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(shape.batch, shape.seq, shape.in_features, generator=gen).to(device, dtype).requires_grad_()
    grad_out = torch.randn(shape.batch, shape.seq, shape.out_features, generator=gen).to(device, dtype)
    return Case(config, model, optimizer, trainable, x, grad_out, time.perf_counter() - start)


def run_timing(job: dict[str, Any]) -> dict[str, Any]:
    """Time every configuration of one shape in ONE process, interleaved step by step.

    Other processes on a shared machine make the speed of the machine drift over minutes;
    timing configurations one after another would turn that drift into fake ratios.
    Interleaving (rotating the order every round) exposes all of them to the same drift.
    Reported per configuration: wall-clock (median, min) and process CPU time per step.
    """
    gc.freeze()  # the ~400k import-time objects are never garbage; see run_memory
    shape = Shape(**job["shape"])
    configs: list[str] = job["configs"]
    device, dtype = torch.device(job["device"]), getattr(torch, job["dtype"])
    load_start = loadavg()
    cases = [build_case(config, shape, device, dtype) for config in configs]
    for case in cases:
        for _ in range(shape.warmup):
            case.step()
    wall: dict[str, list[float]] = {c: [] for c in configs}
    cpu: dict[str, list[float]] = {c: [] for c in configs}
    for round_index in range(shape.reps):
        shift = round_index % len(cases)
        for case in cases[shift:] + cases[:shift]:
            sync(device)
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            case.step()
            sync(device)
            wall[case.config].append(time.perf_counter() - wall_start)
            cpu[case.config].append(time.process_time() - cpu_start)
    return {
        "wall": wall,
        "cpu": cpu,
        "build_s": {case.config: case.build_s for case in cases},
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "torch_threads": torch.get_num_threads(),
    }


def run_memory(job: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of ``mem_steps`` training steps of one configuration, alone in a fresh process.

    One warm-up step first (thread pools, lazy library buffers and autograd's first-use
    allocations are not the adapter's cost); then gradients and optimizer state are dropped so
    the measured steps include creating them. Also records what the forward leaves alive for
    backward (``held``): in a network that is held for every layer at once, so it is the part
    that multiplies with depth, while the rest of the step peak is transient.
    """
    # Freezing keeps each gc.collect() below from walking (0.5 s) and copy-on-write-touching
    # the import-time objects inherited from the forkserver.
    gc.freeze()
    shape = Shape(**job["shape"])
    config: str = job["config"]
    device, dtype = torch.device(job["device"]), getattr(torch, job["dtype"])
    # Before the first tensor: a block glibc once placed in its heap stays in its free lists
    # and, when reused, keeps its pages resident after the next free, so RSS would count
    # dead temporaries. With the threshold set first, every tensor > 64 KiB is its own mmap.
    transparent = device.type == "cpu" and make_allocator_transparent()
    case = build_case(config, shape, device, dtype)
    case.step()
    if case.optimizer is not None:
        case.optimizer.state.clear()
        case.optimizer.zero_grad(set_to_none=True)
    case.x.grad = None
    gc.collect()
    held: list[int] = []

    probe = PeakMemory(device)
    before = probe.start()

    def record_held() -> None:
        held.append(probe.current() - before)

    for _ in range(shape.mem_steps):
        case.step(after_forward=record_held)
    step_peak = probe.stop() - before
    retained = probe.current() - before
    method = probe.method + (", glibc mmap threshold 64 KiB" if transparent else "")

    k_match = re.search(r"_k(\d+)", config)
    return {
        "shape": shape.name,
        "shape_label": shape.label(),
        "in_features": shape.in_features,
        "out_features": shape.out_features,
        "tokens": shape.tokens,
        "config": config,
        "k": int(k_match.group(1)) if k_match else None,
        "trainable_params": sum(p.numel() for p in case.trainable),
        "adapter_state_bytes": adapter_state_bytes(case.model),
        "held_after_forward_bytes": int(max(held)),
        "step_peak_bytes": int(step_peak),
        "retained_after_steps_bytes": int(retained),
        "memory_method": method,
        "mem_steps": shape.mem_steps,
        "build_s": case.build_s,
    }


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def merge_rows(shape: Shape, configs: list[str], timing: dict[str, Any], memory: dict[str, dict]) -> list[dict]:
    """One row per configuration: its memory child's result plus its timings (or an error)."""
    rows = []
    for config in configs:
        mem = memory[config]
        if not mem["ok"]:
            rows.append({"shape": shape.name, "config": config, "error": f"memory run: {mem['error']}"})
            continue
        row = dict(mem["result"])
        if not timing["ok"]:
            rows.append({**row, "error": f"timing run: {timing['error']}"})
            continue
        wall, cpu = timing["result"]["wall"][config], timing["result"]["cpu"][config]
        row.update(
            step_times_s=wall,
            median_step_s=statistics.median(wall),
            min_step_s=min(wall),
            median_cpu_s=statistics.median(cpu),
            warmup=shape.warmup,
            reps=shape.reps,
            torch_threads=timing["result"]["torch_threads"],
            timing_loadavg=[timing["result"]["loadavg_start"], timing["result"]["loadavg_end"]],
        )
        rows.append(row)
    return rows


def add_derived(rows: list[dict[str, Any]]) -> None:
    """Add memory over the frozen layer and ratios to LoRA r=8 of the same shape, in place."""
    ok = [r for r in rows if "error" not in r]
    by_key = {(r["shape"], r["config"]): r for r in ok}
    for row in ok:
        frozen = by_key.get((row["shape"], "frozen"))
        lora = by_key.get((row["shape"], "lora_r8"))
        if frozen is not None:
            row["extra_step_bytes"] = row["step_peak_bytes"] - frozen["step_peak_bytes"]
            row["extra_held_bytes"] = row["held_after_forward_bytes"] - frozen["held_after_forward_bytes"]
            row["extra_total_bytes"] = row["extra_step_bytes"] + row["adapter_state_bytes"]
        if lora is not None and row["config"] != "frozen":
            row["time_vs_lora"] = row["median_step_s"] / lora["median_step_s"]
            row["cpu_time_vs_lora"] = row["median_cpu_s"] / lora["median_cpu_s"]
            row["step_peak_vs_lora"] = row["step_peak_bytes"] / max(1, lora["step_peak_bytes"])


def evaluate_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets for NeuroAda k=1 (and the previous op, if run), per shape.

    * memory: step peak + adapter state <= LoRA r=8's;
    * dense: what NeuroAda adds over the frozen layer <= DENSE_FRACTION_TARGET x what the dense
      reference adds, judged twice: on the single-layer step peak (transient) and on the
      memory held from forward to backward (which a network holds for every layer at once);
    * time: median step time <= TIME_RATIO_TARGET x LoRA's (CPU-time ratio reported alongside).
    """
    by_key = {(r["shape"], r["config"]): r for r in rows if "error" not in r}
    verdicts = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        lora, dense = by_key.get((shape, "lora_r8")), by_key.get((shape, "dense_k1"))
        for config in ("neuroada_k1", "neuroada_k1_previous"):
            ours = by_key.get((shape, config))
            if ours is None or lora is None:
                continue
            total = ours["step_peak_bytes"] + ours["adapter_state_bytes"]
            lora_total = lora["step_peak_bytes"] + lora["adapter_state_bytes"]
            verdict: dict[str, Any] = {
                "shape": shape,
                "config": config,
                "memory_vs_lora": total / max(1, lora_total),
                "memory_ok": total <= lora_total,
                "time_vs_lora": ours["median_step_s"] / lora["median_step_s"],
                "cpu_time_vs_lora": ours["median_cpu_s"] / lora["median_cpu_s"],
                "time_ok": ours["median_step_s"] <= TIME_RATIO_TARGET * lora["median_step_s"],
            }
            if dense is not None and "extra_total_bytes" in ours:
                verdict["peak_extra_vs_dense"] = ours["extra_total_bytes"] / max(1, dense["extra_total_bytes"])
                verdict["peak_dense_ok"] = verdict["peak_extra_vs_dense"] <= DENSE_FRACTION_TARGET
                verdict["held_extra_vs_dense"] = max(0, ours["extra_held_bytes"]) / max(1, dense["extra_held_bytes"])
                verdict["held_dense_ok"] = verdict["held_extra_vs_dense"] <= DENSE_FRACTION_TARGET
            verdicts.append(verdict)
    return verdicts


def results_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of every row (errors included)."""
    lines = [
        "| shape | config | trainable | adapter state MiB | median step ms | min ms | CPU ms/step | time / LoRA "
        "| held fwd->bwd over frozen MiB | step peak MiB | peak over frozen MiB | peak / LoRA |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    labels = {r["shape"]: r["shape_label"] for r in rows if "shape_label" in r}
    for row in rows:
        label = labels.get(row["shape"], row["shape"])
        if "error" in row:
            lines.append(f"| {label} | {row['config']} | ERROR: {row['error']} | | | | | | | | | |")
            continue
        lines.append(
            f"| {label} | {row['config']} | {row['trainable_params']:,} | {mib(row['adapter_state_bytes'])} "
            f"| {row['median_step_s'] * 1e3:,.1f} | {row['min_step_s'] * 1e3:,.1f} | {row['median_cpu_s'] * 1e3:,.1f} "
            f"| {ratio(row.get('time_vs_lora'))} | {mib(row.get('extra_held_bytes'))} "
            f"| {mib(row['step_peak_bytes'])} | {mib(row.get('extra_step_bytes'))} "
            f"| {ratio(row.get('step_peak_vs_lora'))} |"
        )
    return "\n".join(lines)


def targets_table(verdicts: list[dict[str, Any]]) -> str:
    """Markdown summary of the issue's targets."""
    limit = DENSE_FRACTION_TARGET
    lines = [
        "| shape | config | (peak + state) / LoRA, <= 1 | peak over frozen / dense's, <= "
        f"{limit} | held over frozen / dense's, <= {limit} | step time / LoRA, <= {TIME_RATIO_TARGET} "
        "| CPU time / LoRA |",
        "|---|---|---|---|---|---|---|",
    ]

    def mark(ok: bool) -> str:
        return " ok" if ok else " MISS"

    for v in verdicts:
        peak = f"{v['peak_extra_vs_dense']:.3f}{mark(v['peak_dense_ok'])}" if "peak_extra_vs_dense" in v else "-"
        held = f"{v['held_extra_vs_dense']:.3f}{mark(v['held_dense_ok'])}" if "held_extra_vs_dense" in v else "-"
        lines.append(
            f"| {v['shape']} | {v['config']} | {v['memory_vs_lora']:.3f}{mark(v['memory_ok'])} | {peak} | {held} "
            f"| {v['time_vs_lora']:.3f}{mark(v['time_ok'])} | {v['cpu_time_vs_lora']:.3f} |"
        )
    return "\n".join(lines)


def markdown_report(payload: dict[str, Any]) -> list[str]:
    """The ``.md`` results file, line by line."""
    title = (
        f"Layer memory/time benchmark ({payload['device']}, {payload['dtype']}{', quick' if payload['quick'] else ''})"
    )
    md = [
        *markdown_header(payload, title),
        "",
        "Step = forward + backward (the input requires grad) + AdamW step on the trainable tensors. "
        "Times: all configurations of a shape in one process, interleaved; `CPU ms/step` is process CPU time "
        "(less sensitive to other load than wall-clock). Memory: each configuration alone in a fresh process; "
        "`step peak` = peak above what existed before the steps (activations, gradients, AdamW state, "
        "temporaries); `held fwd->bwd` = memory the forward leaves alive for backward (held for every layer "
        "of a network at once); `over frozen` = minus the same quantity for the bare frozen layer; "
        "`adapter state` = persistent adapter tensors (theta + indices, LoRA A/B, ...).",
        "",
        results_table(payload["rows"]),
        "",
        "## Issue targets (NeuroAda k=1)",
        "",
        targets_table(payload["targets"]),
        "",
    ]
    if payload.get("previous_check_max_abs_diff") is not None:
        md += [
            "`*_previous` rows: our layer running the `sparse_bypass` from before commit 802f841 (kept in this "
            "script); the plain `neuroada_*` rows run the op of the checked-out tree. Previous vs current op "
            "(fp64; k=1, 3, 11; duplicate indices; multi-block paths): max abs difference "
            f"{payload['previous_check_max_abs_diff']:.3g}.",
            "",
        ]
    return md


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small shapes, 2 reps")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument(
        "--previous-op", action="store_true", help="also run the sparse_bypass from before 802f841 (before/after)"
    )
    parser.add_argument("--configs", nargs="+", choices=ALL_CONFIGS, help="run only these configurations")
    parser.add_argument("--shapes", nargs="+", help="run only these shape names (attn, mlp_up, mlp_down)")
    parser.add_argument("--reps", type=int, help="timed steps per configuration (overrides the shape's default)")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per child process")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    git_at_start = git_state()  # before the forkserver imports the package: the code measured
    device = resolve_device(args.device)

    shapes = list(QUICK_SHAPES if args.quick else FULL_SHAPES)
    if args.shapes:
        shapes = [s for s in shapes if s.name in args.shapes]
        if not shapes:
            raise SystemExit(f"no shape matches {args.shapes}")
    if args.reps is not None:
        shapes = [dataclasses.replace(s, reps=max(1, args.reps)) for s in shapes]
    configs = list(dict.fromkeys(args.configs or (BASE_CONFIGS + (PREVIOUS_CONFIGS if args.previous_op else ()))))
    for needed in ("lora_r8", "frozen"):  # every ratio is taken against these two
        if needed not in configs:
            configs.insert(0, needed)

    previous_diff = None
    if any(c.endswith("_previous") for c in configs):
        previous_diff = check_previous_matches_current()
        if not previous_diff < 1e-10:
            raise SystemExit(f"previous op disagrees with the current op: max abs diff {previous_diff}")

    # Children fork from a server that imported torch/peft but never ran an op or touched CUDA.
    context = forkserver_context(["torch", "peft", "neuroada_plugin"])
    load_start = loadavg()
    rows: list[dict[str, Any]] = []
    for shape in shapes:
        base_job = {"shape": dataclasses.asdict(shape), "device": str(device), "dtype": args.dtype}
        timing = run_isolated(context, run_timing, {**base_job, "configs": configs}, args.timeout)
        print(f"[{shape.name}] timing {'done' if timing['ok'] else 'FAILED: ' + timing['error']}", file=sys.stderr)
        memory = {}
        for config in configs:
            memory[config] = run_isolated(context, run_memory, {**base_job, "config": config}, args.timeout)
            result = memory[config]
            status = (
                f"step peak {result['result']['step_peak_bytes'] / MIB:.2f} MiB" if result["ok"] else result["error"]
            )
            print(f"[{shape.name} {config}] memory: {status}", file=sys.stderr, flush=True)
        rows += merge_rows(shape, configs, timing, memory)
    add_derived(rows)
    payload = {
        "benchmark": "layer_memory",
        "quick": args.quick,
        "device": str(device),
        "dtype": args.dtype,
        "command": shlex.join(["python", "benchmarks/layer_memory.py", *(sys.argv[1:] if argv is None else argv)]),
        "timestamp": utc_timestamp(),
        "machine": machine_info(device),
        "git": git_at_start,
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "memory_methods": sorted({r["memory_method"] for r in rows if "memory_method" in r}),
        "shapes": [dataclasses.asdict(s) for s in shapes],
        "configs": configs,
        "rows": rows,
        "targets": evaluate_targets(rows),
        "previous_check_max_abs_diff": previous_diff,
        "wall_s": time.perf_counter() - started,
    }
    stem = f"layer_memory-{device.type}-{args.dtype}{'-quick' if args.quick else ''}"
    json_path, md_path = write_results(payload, args.output_dir, stem, markdown_report(payload))
    print(results_table(rows))
    print()
    print(targets_table(payload["targets"]))
    print(f"\nwrote {json_path} and {md_path}")
    return payload


if __name__ == "__main__":
    main()

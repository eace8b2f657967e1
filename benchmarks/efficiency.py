"""Whole-model training-step efficiency: NeuroAda vs LoRA vs full/masked fine-tuning and sparse peers.

One training step = forward with labels (causal-LM loss) + backward + ``AdamW.step()`` +
``zero_grad(set_to_none=True)``, at a fixed batch x sequence of random token ids, on two models:

* ``smollm2``: SmolLM2-135M-Instruct (the offline checkpoint, ``smollm2_checkpoint()``), a real
  small model: 30 layers, GQA, tied embeddings; 4 x 256 tokens (a step takes seconds on 2 cores).
* ``llama7b_2l``: Llama-2-7B layer shapes (hidden 4096, MLP 11008, 32 heads, vocab 32000) but
  only 2 decoder layers, random init (seed 0, built in-process from a ``LlamaConfig``): the
  projection shapes adapters meet at 7B scale, with full fine-tuning's weights + gradients +
  AdamW state (~11 GiB) still fitting the 24 GiB machine; 1 x 256 tokens.

Configurations, each in a FRESH process, adapting q, k, v, o, gate, up and down projections
of every layer; embeddings, norms and lm_head frozen except in ``full_ft``:

* ``frozen_backward``    nothing trainable, but input gradients on (``enable_input_require_grads``),
                         so backward runs through every layer as it does for any adapter: the
                         floor of activations, logits and input gradients all methods share.
                         ``added over frozen backward`` = a method's peak minus this floor: what
                         the method itself costs (its state, gradients, AdamW state and whatever
                         extra it keeps for backward, e.g. the dense reference's weight copies).
* ``full_ft``            every weight trainable (the ceiling).
* ``masked_ft``          the targeted weights trainable in full, their gradients multiplied by a
                         0/1 mask of NeuroAda k=1's selection (post-accumulate hook): the usual way
                         to "train a sparse subset", paying dense gradients + AdamW state + mask.
* ``lora_r8``            PEFT LoRA, r=8, alpha=16, dropout 0.
* ``supertuning``        PEFT Super-Tuning (magnitude top-k over the whole matrix). Its
                         ``sparsity`` is global, so each layer is re-initialised with the sparsity
                         that leaves exactly ``out_features`` entries: NeuroAda k=1's budget.
* ``shira``              PEFT SHiRA (random mask). It trains ``r * (in + out)`` entries per layer
                         with an integer ``r >= 1``, so NeuroAda k=1's ``out`` entries cannot be
                         matched; ``r=1`` (the smallest budget, ``in + out`` per layer: 2-3.7x
                         NeuroAda k=1's) is used and the exact count is reported.
* ``dense_neuroada_k1``  the official NeuroAda code's forward, ``F.linear(x, W + scatter(idx,
                         theta))``, with the same selection (``select_connections``).
* every registered method of this project (``neuroada_plugin.registry``), ``peft.get_peft_model``
  with its default config, named after the method and its size: ``neuroada_k1``
  (``NeuroAdaConfig()``, top_k=1; ``neuroada_k20`` is the one extra variant) and ``neat_r8``
  (``NeatConfig()``: r=8, depth 0, relu, scale 1; the update ``s * B (act(A W0) x)`` without a
  weight-sized tensor).
* ``peanut_r8``          PEFT's PEANuT (the same method), ``PeanutConfig(r=8)`` with the same settings:
                         builds the dense ``dW`` in every forward.
* ``smoa_r16``           SMoA with 2 blocks and r=16 (alpha 16): about LoRA r=8's trainable count
                         (``smoa_r8``, the authors' default, trains about half of it).
* ``hira_r8``            PEFT's HiRA, r=8 (SMoA with one block is HiRA): ``W0 * (B A)`` as a dense
                         weight-sized tensor in every forward, the peer of SMoA.
* ``neft_share0.004``    NeFT at 0.4% of all parameters (whole neurons of up_proj rows / down_proj
                         columns; the data-free magnitude selection: memory and time do not depend on
                         which neurons are chosen, only on how many).
* ``lora_neft_count``    PEFT LoRA on the same projections as every row, its rank chosen per model so its
                         trainable count is closest to NeFT's 0.4% (the issue's "similar count").
* ``masked_neft``        what the official NeFT code does: up_proj and down_proj trainable in full, their
                         gradients multiplied by a 0/1 mask of NeFT's selection (dense gradients + AdamW
                         state for both matrices of every layer).

AdamW (lr 1e-5, weight_decay 0 so that masked entries really stay put) on the trainable
tensors only. Checkpoint weights are copied out of the safetensors mmap right after loading:
otherwise RSS after load would not count them (pages fault in during the first step) and full
fine-tuning's in-place updates would copy-on-write them.

Memory (one fresh process per configuration). CPU: resident set size, measured with
``_measure.PeakMemory``: glibc serves every block > 64 KiB with its own mmap and returns freed
pages, so RSS follows live tensors; after one warm-up step (thread pools, lazy buffers, and the
AdamW state, which stays: training's steady state) the kernel's peak counter is reset
(``clear_refs``) and ``VmHWM`` over one more step is the peak. CUDA: ``max_memory_allocated``.
Reported: ``peak`` (total) and ``peak over weights`` = peak minus the memory right after loading
the frozen model, before any adapter: adapter state + masks + gradients + AdamW state +
activations + temporaries, what training adds to the weights. The issue's ratios use the
latter (interpreter and frozen weights are the same for every configuration and only dilute
differences); total-peak ratios are shown next to them.

Time (fresh processes of their own, DEFAULT allocator: one mmap per block costs page faults,
measured +30-50% step time on CPU): ``--rounds`` timing processes per configuration (default 2),
the rounds alternating the order of configurations (forward, then backward) so that a drift of
the machine's speed weighs on all alike; median wall-clock over the ``--steps`` steps of every
round (each after its warm-up), per-round medians alongside, plus process CPU time per step.
``OMP_WAIT_POLICY=PASSIVE`` unless set: on a
shared machine, spinning OpenMP workers waiting at every op's barrier for a thread descheduled
by another process made SmolLM2 steps 8x slower (and tiny-model steps 100x) than sleeping
ones, a distortion that grows with the number of small ops (PEFT adapters, per-tensor AdamW).
Load from other processes is recorded per child (load average at its start and end) and
should be read alongside; ``--quick`` times the memory process's steps instead
(``--shared-process``, one round).

Run ``python benchmarks/efficiency.py`` (full: about 25 minutes on 2 quiet CPU cores) or
``--quick`` (tiny stand-ins for both models, 1 measured step, < 1 min). Options: ``--models``,
``--configs``, ``--steps``, ``--warmup``, ``--rounds``, ``--batch``/``--seq`` (override every
selected model's), ``--device auto|cpu|cuda``, ``--dtype float32|bfloat16``.
Results: ``benchmarks/results/efficiency-<device>-<dtype>[-quick].{json,md,png}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _measure import (
    MIB,
    REPO_ROOT,
    DenseComposition,
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
    mib,
    ratio,
    resolve_device,
    run_isolated,
    supertuning_sparsity,
    sync,
    utc_timestamp,
    write_results,
)
from torch import nn

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FLOOR = "frozen_backward"
# The references: the floor, full and masked fine-tuning, PEFT's LoRA, Super-Tuning and SHiRA, and
# the official NeuroAda code's dense forward. Every registered method follows with its default
# config (VARIANTS: more rows of a method), then PEFT's PEANuT and HiRA, the peers of NEAT and SMoA.
REFERENCES = (FLOOR, "full_ft", "masked_ft", "lora_r8", "supertuning", "shira", "dense_neuroada_k1")
PEERS_AFTER = ("peanut_r8", "hira_r8", "lora_neft_count", "masked_neft")
NEFT_ROW = "neft_share0.004"
NEFT_SHARE = 0.004
VARIANTS = {"neuroada": [{"top_k": 20}], "smoa": [{"r": 16, "alpha": 16.0}]}
SHIRA_R = 1  # smallest SHiRA budget: r * (in + out) entries per layer
LEARNING_RATE = 1e-5
MEMORY_STEPS = 1  # after the warm-up the AdamW state is alive: one step is the steady-state peak

# Targets for NeuroAda k=1 on SmolLM2 (memory = peak over the loaded weights).
TARGET_MODEL = "smollm2"
MEMORY_VS_LORA_TARGET = 1.0
MEMORY_VS_DENSE_TARGET = 0.6  # vs dense_neuroada_k1 and vs supertuning
TIME_VS_LORA_TARGET = 1.15
# NEAT r=8: memory within 1.1x LoRA r=8 and well under PEFT's PEANuT, step time within 1.3x LoRA.
NEAT_MEMORY_VS_LORA_TARGET = 1.1
NEAT_MEMORY_VS_PEANUT_TARGET = 0.9
NEAT_TIME_VS_LORA_TARGET = 1.3
# SMoA r=16 (about LoRA r=8's trainable count): memory within 1.2x LoRA and <= HiRA's, time within 1.5x LoRA.
SMOA_MEMORY_VS_LORA_TARGET = 1.2
SMOA_MEMORY_VS_HIRA_TARGET = 1.0
SMOA_TIME_VS_LORA_TARGET = 1.5
# NeFT at 0.4%: memory within 1.2x a LoRA of the same trainable count, and far below dense masked training.
NEFT_MEMORY_VS_LORA_TARGET = 1.2
NEFT_MEMORY_VS_MASKED_TARGET = 0.5
# (method, target text, reference config, kind, limit); kinds: memory, time_best (deciding), time (shown).
TARGET_CHECKS = (
    ("neuroada_k1", "peak over weights <= LoRA r=8", "lora_r8", "memory", MEMORY_VS_LORA_TARGET),
    (
        "neuroada_k1",
        "peak over weights <= 0.6 x dense_neuroada_k1",
        "dense_neuroada_k1",
        "memory",
        MEMORY_VS_DENSE_TARGET,
    ),
    ("neuroada_k1", "peak over weights <= 0.6 x supertuning", "supertuning", "memory", MEMORY_VS_DENSE_TARGET),
    ("neuroada_k1", "best-round step time <= 1.15 x LoRA r=8", "lora_r8", "time_best", TIME_VS_LORA_TARGET),
    ("neuroada_k1", "median step time, all rounds <= 1.15 x LoRA r=8", "lora_r8", "time", TIME_VS_LORA_TARGET),
    ("neat_r8", "peak over weights <= 1.1 x LoRA r=8", "lora_r8", "memory", NEAT_MEMORY_VS_LORA_TARGET),
    ("neat_r8", "peak over weights <= 0.9 x PEANuT r=8", "peanut_r8", "memory", NEAT_MEMORY_VS_PEANUT_TARGET),
    ("neat_r8", "best-round step time <= 1.3 x LoRA r=8", "lora_r8", "time_best", NEAT_TIME_VS_LORA_TARGET),
    ("neat_r8", "median step time, all rounds <= 1.3 x LoRA r=8", "lora_r8", "time", NEAT_TIME_VS_LORA_TARGET),
    ("smoa_r16", "peak over weights <= 1.2 x LoRA r=8", "lora_r8", "memory", SMOA_MEMORY_VS_LORA_TARGET),
    ("smoa_r16", "peak over weights <= HiRA r=8", "hira_r8", "memory", SMOA_MEMORY_VS_HIRA_TARGET),
    ("smoa_r16", "best-round step time <= 1.5 x LoRA r=8", "lora_r8", "time_best", SMOA_TIME_VS_LORA_TARGET),
    ("smoa_r16", "median step time, all rounds <= 1.5 x LoRA r=8", "lora_r8", "time", SMOA_TIME_VS_LORA_TARGET),
    (NEFT_ROW, "peak over weights <= 1.2 x LoRA of NeFT's count", "lora_neft_count", "memory", NEFT_MEMORY_VS_LORA_TARGET),
    (NEFT_ROW, "peak over weights <= 0.5 x masked up/down (official code)", "masked_neft", "memory",
     NEFT_MEMORY_VS_MASKED_TARGET),
)


@functools.cache
def registered_rows() -> dict[str, MethodRow]:
    """The registered methods' rows (:func:`_measure.method_rows`), by name."""
    return {row.key: row for row in method_rows(VARIANTS)}


def configs() -> tuple[str, ...]:
    """Every configuration, in report order: the references, the registered methods, the PEFT peers."""
    return (*REFERENCES, *registered_rows(), *PEERS_AFTER)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A benchmarked model: where it comes from and the batch x sequence of its step."""

    key: str
    label: str
    batch: int
    seq: int
    checkpoint: str | None = None  # "smollm2": the offline SmolLM2 checkpoint; None: synthetic
    llama: dict[str, Any] | None = None  # LlamaConfig settings of a synthetic model


LLAMA2_7B_SHAPES = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    rms_norm_eps=1e-5,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)
FULL_MODELS = (
    ModelSpec("smollm2", "SmolLM2-135M-Instruct", batch=4, seq=256, checkpoint="smollm2"),
    ModelSpec(
        "llama7b_2l",
        "Llama-2-7B layer shapes, 2 decoder layers (random init)",
        batch=1,
        seq=256,
        llama={**LLAMA2_7B_SHAPES, "num_hidden_layers": 2},
    ),
)
QUICK_MODELS = (
    ModelSpec(
        "smollm2",
        "tiny Llama (quick stand-in for SmolLM2: GQA, tied embeddings)",
        batch=2,
        seq=32,
        llama=dict(
            hidden_size=64,
            intermediate_size=160,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_hidden_layers=2,
            vocab_size=1024,
            max_position_embeddings=256,
            tie_word_embeddings=True,
        ),
    ),
    ModelSpec(
        "llama7b_2l",
        "tiny Llama (quick stand-in for the Llama-2-7B-shaped model)",
        batch=1,
        seq=32,
        llama=dict(
            hidden_size=128,
            intermediate_size=344,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_hidden_layers=2,
            vocab_size=1024,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        ),
    ),
)
MODEL_KEYS = tuple(spec.key for spec in FULL_MODELS)


# --------------------------------------------------------------------------------------------
# Models and configurations (run inside the fresh child)
# --------------------------------------------------------------------------------------------


def load_model(spec: ModelSpec, checkpoint_dir: str | None, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The frozen base model in training mode: the checkpoint, or a seeded random Llama."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if spec.checkpoint is not None:
        model = AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=dtype).to(device)
        if device.type == "cpu":  # own the memory, out of the file's mmap (module docstring); ties survive
            with torch.no_grad():
                for tensor in [*model.parameters(), *model.buffers()]:
                    tensor.data = tensor.data.clone()
    else:
        torch.manual_seed(0)
        with device:
            model = LlamaForCausalLM._from_config(LlamaConfig(**spec.llama), dtype=dtype)
    model.requires_grad_(False)
    model.train()
    return model


def target_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The adapted projections: every ``nn.Linear`` whose name ends with a TARGET_MODULES entry."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGET_MODULES
    ]


def unique_numel(params: list[nn.Parameter] | Any) -> int:
    """Elements of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in params}.values())


def _grad_mask_hook(mask: torch.Tensor) -> Any:
    """A post-accumulate-grad hook zeroing the gradient outside ``mask`` (in place, no copy)."""

    def hook(param: torch.Tensor) -> None:
        param.grad.mul_(mask)

    return hook


def apply_config(config: str, model: nn.Module) -> tuple[nn.Module, list[nn.Parameter], int]:
    """Set ``model`` up for ``config``; returns (model, parameters given to AdamW, entries that can change)."""
    import peft

    from neuroada_plugin import select_connections

    targets = target_linears(model)
    if config == FLOOR:
        # Nothing trainable, but the backward pass still runs through every layer (as it must for any
        # adapter): the memory every method pays for activations, logits and input gradients.
        model.requires_grad_(False)
        model.enable_input_require_grads()
        return model, [], 0
    if config == "full_ft":
        model.requires_grad_(True)
        trainable = list({id(p): p for p in model.parameters()}.values())
        return model, trainable, unique_numel(trainable)
    if config == "masked_ft":
        updated = 0
        for _, linear in targets:
            weight = linear.weight
            mask = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
            mask.scatter_(1, select_connections(weight, 1), True)
            weight.requires_grad_(True)
            weight.register_post_accumulate_grad_hook(_grad_mask_hook(mask))
            updated += weight.shape[0]
        return model, [linear.weight for _, linear in targets], updated
    if config == "dense_neuroada_k1":
        for name, linear in targets:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, DenseComposition(linear, 1))
        trainable = [p for p in model.parameters() if p.requires_grad]
        return model, trainable, unique_numel(trainable)

    if config == "masked_neft":
        updated = 0
        for name, (axis, index) in neft_selection(model).items():
            weight = model.get_submodule(name).weight
            mask = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
            if axis == "rows":
                mask[index] = True
            else:
                mask[:, index] = True
            weight.requires_grad_(True)
            weight.register_post_accumulate_grad_hook(_grad_mask_hook(mask))
            updated += int(mask.sum())
        trainable = [p for p in model.parameters() if p.requires_grad]
        return model, trainable, updated

    target_list = list(TARGET_MODULES)
    if config in registered_rows():
        peft_config: Any = registered_rows()[config].config(target_modules=target_list)
    elif config == "lora_r8":
        peft_config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=target_list)
    elif config == "shira":
        peft_config = peft.ShiraConfig(r=SHIRA_R, target_modules=target_list, random_seed=0)
    elif config == "supertuning":
        # Any sparsity that leaves >= 1 entry in the smallest layer; every layer is then redone below.
        smallest = min((linear for _, linear in targets), key=lambda lin: lin.weight.numel())
        peft_config = peft.SupertuningConfig(
            sparsity=supertuning_sparsity(smallest.out_features, smallest.in_features), target_modules=target_list
        )
    elif config == "peanut_r8":
        peft_config = peft.PeanutConfig(r=8, depth=0, act_fn="relu", scaling=1.0, target_modules=target_list)
    elif config == "hira_r8":
        peft_config = peft.HiraConfig(r=8, target_modules=target_list)
    elif config == "lora_neft_count":
        budget = NEFT_SHARE * unique_numel(model.parameters())
        per_rank = sum(linear.in_features + linear.out_features for _, linear in targets)
        peft_config = peft.LoraConfig(
            r=max(1, round(budget / per_rank)), lora_alpha=16, lora_dropout=0.0, target_modules=target_list
        )
    else:
        raise ValueError(f"unknown configuration {config!r}; known: {configs()}")
    model = peft.get_peft_model(model, peft_config)
    if config == "supertuning":
        from peft.tuners.supertuning.layer import SupertuningLayer

        for module in model.modules():
            if isinstance(module, SupertuningLayer):
                per_layer = dataclasses.replace(
                    peft_config, sparsity=supertuning_sparsity(module.out_features, module.in_features)
                )
                module.update_layer("default", config=per_layer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, trainable, unique_numel(trainable)


def neft_selection(model: nn.Module) -> dict[str, tuple[str, torch.Tensor]]:
    """NeFT's selection at ``NEFT_SHARE`` (the ``neft_share0.004`` row's): ``{layer: (axis, indices)}``."""
    from peft.tuners.tuners_utils import check_target_module_exists

    from neuroada_plugin import NeftConfig
    from neuroada_plugin.neft.model import plan_neurons

    config = NeftConfig(selection="magnitude", neuron_share=NEFT_SHARE, target_modules=["up_proj", "down_proj"])
    plan = plan_neurons(config, model, lambda name: bool(check_target_module_exists(config, name)))
    return {name: entry for name, entry in plan.items() if entry[1].numel()}


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer | None, input_ids: torch.Tensor) -> float:
    """Forward with labels, backward, AdamW step, gradients freed (as ``transformers.Trainer`` does)."""
    loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
    loss.backward()
    if optimizer is not None:  # None: the frozen-backward floor
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _settle(device: torch.device) -> None:
    gc.collect()
    sync(device)
    if device.type == "cpu":
        glibc_trim()


def run_config(job: dict[str, Any]) -> dict[str, Any]:
    """Load the model, apply one configuration, warm up, then run ``steps`` measured training steps.

    ``job["measure"]``: ``"memory"`` (allocator made transparent, peak over the steps),
    ``"timing"`` (default allocator, wall/CPU time per step) or ``"both"`` in one process.
    The warm-up step also creates the AdamW state, which stays: the measured steps are the
    steady state of training (state alive, gradients created and freed every step).
    """
    gc.freeze()  # the import-time objects inherited from the forkserver are never garbage
    spec = ModelSpec(**job["model"])
    config: str = job["config"]
    measure: str = job["measure"]
    device, dtype = torch.device(job["device"]), getattr(torch, job["dtype"])
    # Before the first tensor (see _measure.make_allocator_transparent). Only for memory runs:
    # one mmap per block > 64 KiB costs page faults (up to 2x step time on CPU), so the
    # timing runs keep the default allocator.
    transparent = measure != "timing" and device.type == "cpu" and make_allocator_transparent()
    probe = PeakMemory(device)
    loadavg_start = loadavg()

    started = time.perf_counter()
    model = load_model(spec, job["checkpoint_dir"], device, dtype)
    base_params = unique_numel(list(model.parameters()))
    targets = target_linears(model)
    result: dict[str, Any] = {
        "model": spec.key,
        "config": config,
        "base_params": base_params,
        "targets": len(targets),
        "target_out_features_sum": sum(lin.out_features for _, lin in targets),
        "target_in_plus_out_sum": sum(lin.in_features + lin.out_features for _, lin in targets),
        "target_weight_numel": sum(lin.weight.numel() for _, lin in targets),
    }
    vocab_size = model.config.vocab_size
    load_s = time.perf_counter() - started
    _settle(device)
    loaded = probe.current()

    started = time.perf_counter()
    model, trainable, updated_entries = apply_config(config, model)
    optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=0.0) if trainable else None
    setup_s = time.perf_counter() - started
    _settle(device)
    after_setup = probe.current()

    generator = torch.Generator(device="cpu").manual_seed(1)
    input_ids = torch.randint(0, vocab_size, (spec.batch, spec.seq), generator=generator).to(device)

    warmup_s = []
    for _ in range(job["warmup"]):
        sync(device)
        start = time.perf_counter()
        train_step(model, optimizer, input_ids)
        sync(device)
        warmup_s.append(time.perf_counter() - start)
    _settle(device)

    before = probe.start() if measure != "timing" else 0
    wall, cpu, losses = [], [], []
    for _ in range(job["steps"]):
        sync(device)
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(train_step(model, optimizer, input_ids))
        sync(device)
        wall.append(time.perf_counter() - wall_start)
        cpu.append(time.process_time() - cpu_start)
    peak = probe.stop() if measure != "timing" else 0

    result.update(
        trainable_params=updated_entries,
        trainable_pct=100.0 * updated_entries / base_params,
        optimizer_params=unique_numel(trainable),
        losses=losses,
        load_s=load_s,
        setup_s=setup_s,
        warmup_s=warmup_s,
        torch_threads=torch.get_num_threads(),
        loadavg=[loadavg_start, loadavg()],
    )
    if measure != "timing":
        result.update(
            loaded_bytes=int(loaded),
            after_setup_bytes=int(after_setup),
            before_steps_bytes=int(before),
            peak_bytes=int(peak),
            peak_over_weights_bytes=int(peak - loaded),
            step_peak_bytes=int(peak - before),
            memory_method=probe.method + (", glibc mmap threshold 64 KiB" if transparent else ""),
            memory_steps=len(wall),
        )
    if measure != "memory":
        result.update(
            step_times_s=wall,
            cpu_times_s=cpu,
            median_step_s=statistics.median(wall),
            min_step_s=min(wall),
            median_cpu_s=statistics.median(cpu),
            timing_allocator="glibc mmap threshold 64 KiB (shared with the memory run)" if transparent else "default",
        )
    else:
        result["memory_run_step_times_s"] = wall
    return result


def run_measure(context: Any, job: dict[str, Any], measure: str, timeout_s: float) -> dict[str, Any]:
    """One fresh process running ``measure`` ("memory", "timing" or "both") for one configuration."""
    steps = job["mem_steps"] if measure == "memory" else job["steps"]
    result = run_isolated(context, run_config, {**job, "measure": measure, "steps": steps}, timeout_s)
    if not result["ok"]:
        return {"model": job["model"]["key"], "config": job["config"], "error": f"{measure} run: {result['error']}"}
    return result["result"]


def add_timing_round(row: dict[str, Any], timing: dict[str, Any]) -> None:
    """Fold one timing process's steps into ``row``: medians are over the steps of every round."""
    row.setdefault("timing_loadavg", []).append(timing["loadavg"])
    row.setdefault("timing_losses", []).append(timing["losses"])
    row.setdefault("round_median_step_s", []).append(timing["median_step_s"])
    row["step_times_s"] = row.get("step_times_s", []) + timing["step_times_s"]
    row["cpu_times_s"] = row.get("cpu_times_s", []) + timing["cpu_times_s"]
    row["median_step_s"] = statistics.median(row["step_times_s"])
    row["min_step_s"] = min(row["step_times_s"])
    row["median_cpu_s"] = statistics.median(row["cpu_times_s"])
    row["timing_allocator"] = timing["timing_allocator"]


def run_model(
    context: Any, jobs: list[dict[str, Any]], separate_timing: bool, rounds: int, timeout_s: float
) -> list[dict[str, Any]]:
    """All configurations of one model: a memory process each, then ``rounds`` timing processes each.

    Timing rounds alternate the order of configurations (forward, backward, forward, ...), so a
    drift of the machine's speed over the run (other tenants, thermal) weighs on every
    configuration alike instead of on whichever ran during the slow minutes.
    """
    rows: dict[str, dict[str, Any]] = {}
    for job in jobs:
        measured = run_measure(context, job, "memory" if separate_timing else "both", timeout_s)
        if "error" in measured:
            rows[job["config"]] = measured
            print(f"[{job['model']['key']} {job['config']}] {measured['error']}", file=sys.stderr, flush=True)
            continue
        row = dict(measured)
        row["memory_loadavg"] = row.pop("loadavg")
        if not separate_timing:  # the steps just measured are the (only) timing round
            for key in ("step_times_s", "cpu_times_s"):
                del row[key]
            add_timing_round(row, {**measured, "loadavg": row["memory_loadavg"]})
        rows[job["config"]] = row
        print(
            f"[{job['model']['key']} {job['config']}] peak over weights "
            f"{row['peak_over_weights_bytes'] / MIB:,.0f} MiB, loss {row['losses'][-1]:.3f}",
            file=sys.stderr,
            flush=True,
        )
    for round_index in range(rounds if separate_timing else 0):
        order = jobs if round_index % 2 == 0 else jobs[::-1]
        for job in order:
            row = rows[job["config"]]
            if "error" in row:
                continue
            timing = run_measure(context, job, "timing", timeout_s)
            if "error" in timing:
                rows[job["config"]] = timing
                continue
            add_timing_round(row, timing)
            print(
                f"[{job['model']['key']} {job['config']}] timing round {round_index + 1}/{rounds}: "
                f"median step {timing['median_step_s']:.2f} s",
                file=sys.stderr,
                flush=True,
            )
    return [rows[job["config"]] for job in jobs]


# --------------------------------------------------------------------------------------------
# Derived numbers, targets and reports (parent process)
# --------------------------------------------------------------------------------------------


def add_derived(rows: list[dict[str, Any]]) -> None:
    """Best timing round, memory added over the frozen-backward floor and ratios to LoRA r=8, in place."""
    for row in rows:
        if "error" not in row:
            row["best_round_step_s"] = min(row["round_median_step_s"])
    lora = {r["model"]: r for r in rows if r["config"] == "lora_r8" and "error" not in r}
    floor = {r["model"]: r for r in rows if r["config"] == FLOOR and "error" not in r}
    for row in rows:
        if "error" not in row and row["model"] in floor:
            row["added_over_floor_bytes"] = (
                row["peak_over_weights_bytes"] - floor[row["model"]]["peak_over_weights_bytes"]
            )
    for row in rows:
        ref = lora.get(row["model"])
        if "error" in row or ref is None:
            continue
        if "added_over_floor_bytes" in row:
            row["added_vs_lora"] = row["added_over_floor_bytes"] / max(1, ref["added_over_floor_bytes"])
        row["peak_over_weights_vs_lora"] = row["peak_over_weights_bytes"] / max(1, ref["peak_over_weights_bytes"])
        row["peak_vs_lora"] = row["peak_bytes"] / max(1, ref["peak_bytes"])
        row["time_vs_lora"] = row["median_step_s"] / ref["median_step_s"]
        row["best_round_time_vs_lora"] = row["best_round_step_s"] / ref["best_round_step_s"]
        row["cpu_time_vs_lora"] = row["median_cpu_s"] / ref["median_cpu_s"]


def evaluate_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue targets (:data:`TARGET_CHECKS`: NeuroAda k=1, NEAT r=8) per model (binding on TARGET_MODEL only).

    Each check: ``value`` = method / reference on peak memory over the loaded weights, or on step
    time: the best round's median (deciding, as ``timeit`` takes the best repeat: load from other
    tenants only ever adds time) and the median over every round's steps (shown beside it).
    ``total`` = the same ratio on total peak memory (memory) or CPU time (time); ``ok`` = value <= limit.
    Memory checks also give ``added`` = method / reference on the memory added over the
    frozen-backward floor (what the method itself costs) with its own ``added_ok``.
    """
    by_key = {(r["model"], r["config"]): r for r in rows if "error" not in r}
    verdicts = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for method, name, reference, kind, limit in TARGET_CHECKS:
            ours, ref = by_key.get((model, method)), by_key.get((model, reference))
            if ours is None or ref is None:
                continue
            added = None
            if kind == "memory":
                value = ours["peak_over_weights_bytes"] / max(1, ref["peak_over_weights_bytes"])
                total = ours["peak_bytes"] / max(1, ref["peak_bytes"])
                if "added_over_floor_bytes" in ours and "added_over_floor_bytes" in ref:
                    added = ours["added_over_floor_bytes"] / max(1, ref["added_over_floor_bytes"])
            else:
                step_key = "best_round_step_s" if kind == "time_best" else "median_step_s"
                value = ours[step_key] / ref[step_key]
                total = ours["median_cpu_s"] / ref["median_cpu_s"]
            verdicts.append(
                {
                    "model": model,
                    "method": method,
                    "target": name,
                    "reference": reference,
                    "kind": kind,
                    "limit": limit,
                    "value": value,
                    "total_or_cpu": total,
                    "ok": value <= limit,
                    "added": added,
                    "added_ok": None if added is None else added <= limit,
                    "binding": model == TARGET_MODEL and kind != "time",
                }
            )
    return verdicts


def results_table(rows: list[dict[str, Any]], model: str) -> str:
    """Markdown table of one model's rows (errors included)."""
    lines = [
        "| config | trained entries | % of model | params with grad + AdamW state | peak MiB | peak over weights MiB "
        "| / LoRA | added over frozen backward MiB | / LoRA | median step s (per round) | / LoRA "
        "| best round / LoRA | CPU s/step "
        "| load avg (1 min) start-end per round |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in (r for r in rows if r["model"] == model):
        if "error" in row:
            lines.append(f"| {row['config']} | ERROR: {row['error']} | | | | | | | | | | | | |")
            continue
        load_text = ", ".join(
            "-" if start is None else f"{start[0]:.1f}-{end[0]:.1f}" for start, end in row["timing_loadavg"]
        )
        per_round = ", ".join(f"{v:.2f}" for v in row["round_median_step_s"])
        lines.append(
            f"| {row['config']} | {row['trainable_params']:,} | {row['trainable_pct']:.4f} "
            f"| {row['optimizer_params']:,} | {mib(row['peak_bytes'], 0)} | {mib(row['peak_over_weights_bytes'], 0)} "
            f"| {ratio(row.get('peak_over_weights_vs_lora'))} "
            f"| {mib(row['added_over_floor_bytes'], 0) if 'added_over_floor_bytes' in row else '-'} "
            f"| {ratio(row.get('added_vs_lora'))} | {row['median_step_s']:.3f} ({per_round}) "
            f"| {ratio(row.get('time_vs_lora'))} | {ratio(row.get('best_round_time_vs_lora'))} "
            f"| {row['median_cpu_s']:.3f} | {load_text} |"
        )
    return "\n".join(lines)


def targets_table(verdicts: list[dict[str, Any]]) -> str:
    """Markdown table of the target checks."""
    lines = [
        "| model | method | target | ratio | verdict | same ratio on total peak (memory) / CPU time (time) "
        "| memory added over the frozen backward: ratio | verdict |",
        "|---|---|---|---:|---|---:|---:|---|",
    ]
    for v in verdicts:
        note = "" if v["binding"] else " (informational)"
        verdict = ("PASS" if v["ok"] else "MISS") + note
        added, added_verdict = "-", "-"
        if v.get("added") is not None:
            added, added_verdict = f"{v['added']:.3f}", ("PASS" if v["added_ok"] else "MISS") + note
        lines.append(
            f"| {v['model']} | {v.get('method', 'neuroada_k1')} | {v['target']} | {v['value']:.3f} | {verdict} "
            f"| {v['total_or_cpu']:.3f} "
            f"| {added} | {added_verdict} |"
        )
    return "\n".join(lines)


def write_plot(rows: list[dict[str, Any]], models: list[ModelSpec], path: Path, title: str) -> Path | None:
    """Bars of peak-over-weights memory and median step time per configuration, one column per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [spec for spec in models if any(r["model"] == spec.key and "error" not in r for r in rows)]
    if not columns:
        return None
    palette = ("tab:green", "tab:olive", "tab:cyan", "tab:purple", "tab:brown")  # one per registered method
    methods = list(dict.fromkeys(row.method for row in registered_rows().values()))
    method_colors = {key: palette[methods.index(row.method) % len(palette)] for key, row in registered_rows().items()}
    fig, axes = plt.subplots(2, len(columns), figsize=(6.5 * len(columns), 8), squeeze=False)
    for col, spec in enumerate(columns):
        ok = [r for r in rows if r["model"] == spec.key and "error" not in r]
        names = [r["config"] for r in ok]
        colors = [method_colors.get(n, "tab:blue" if n == "lora_r8" else "tab:gray") for n in names]
        panels = (
            ([r["peak_over_weights_bytes"] / MIB for r in ok], "peak memory over loaded weights (MiB)"),
            ([r["median_step_s"] for r in ok], "median step time (s)"),
        )
        for row_index, (values, ylabel) in enumerate(panels):
            ax = axes[row_index][col]
            ax.bar(range(len(values)), values, color=colors)
            if "lora_r8" in names:
                ax.axhline(values[names.index("lora_r8")], color="tab:blue", linestyle="--", linewidth=0.8)
            ax.set_xticks(range(len(values)), names, rotation=40, ha="right", fontsize=8)
            ax.set_ylabel(ylabel)
            if row_index == 0:
                ax.set_title(f"{spec.label}\n{spec.batch} x {spec.seq} tokens", fontsize=9)
            for x, value in enumerate(values):
                ax.annotate(f"{value:,.3g}", (x, value), ha="center", va="bottom", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_report(payload: dict[str, Any], models: list[ModelSpec]) -> list[str]:
    """The ``.md`` results file, line by line."""
    title = f"Training-step efficiency ({payload['device']}, {payload['dtype']}{', quick' if payload['quick'] else ''})"
    md = [
        *markdown_header(payload, title),
        f"- steps: {payload['warmup']} warm-up, then {payload['memory_steps']} for memory and {payload['steps']} "
        f"timed ({'a separate process with the default allocator' if payload['separate_timing_process'] else 'in the memory process'}); "
        f"torch threads: {sorted({r['torch_threads'] for r in payload['rows'] if 'torch_threads' in r})}; "
        f"OMP_WAIT_POLICY={payload['omp_wait_policy']}",
        "",
        "Step = forward with labels + backward + AdamW step (lr 1e-5, weight decay 0) + zero_grad, random token "
        "ids. Adapters on q/k/v/o/gate/up/down of every layer; embeddings, norms and lm_head frozen except in "
        "`full_ft`. Each configuration runs alone in fresh processes; the warm-up step creates the AdamW state, "
        "which stays alive (steady state). `peak` = peak memory during the measured step (CPU: RSS incl. "
        "interpreter and libraries; CUDA: allocated tensors); `peak over weights` = peak minus the memory right "
        "after loading the frozen model: adapter state, masks, gradients, AdamW state, activations and "
        "temporaries. `trained entries` = weight entries that can change (for `masked_ft` the mask's, while "
        "gradients and AdamW state cover every targeted weight: next column). Super-Tuning gets exactly NeuroAda "
        "k=1's budget per layer (`out_features`); SHiRA's cannot be made equal (integer r, r*(in+out) entries "
        f"per layer), r={SHIRA_R} is its smallest. Step time: median over "
        f"{payload['timing_rounds']} timing process(es) per configuration x {payload['steps']} steps, rounds in "
        "alternating order (per-round medians in brackets); read them with the load average column.",
        "",
    ]
    for spec in models:
        row = next((r for r in payload["rows"] if r["model"] == spec.key and "error" not in r), None)
        extra = ""
        if row is not None:
            extra = (
                f"; {row['base_params']:,} parameters, {row['targets']} adapted projections "
                f"(sum of out_features {row['target_out_features_sum']:,}); loaded model: {mib(row['loaded_bytes'], 0)} MiB"
            )
        md += [
            f"## {spec.key}: {spec.label}, {spec.batch} x {spec.seq} tokens{extra}",
            "",
            results_table(payload["rows"], spec.key),
            "",
        ]
    md += [
        f"## Targets (NeuroAda k=1, NEAT r=8; binding on `{TARGET_MODEL}`)",
        "",
        targets_table(payload["targets"]),
        "",
    ]
    if payload["quick"]:
        md += ["Quick run: tiny stand-in models, one measured step; the verdicts are a smoke test only.", ""]
    if payload.get("plot"):
        md += [f"![efficiency plot]({Path(payload['plot']).name})", ""]
    return md


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny stand-in models, 1 measured step")
    parser.add_argument("--models", nargs="+", choices=MODEL_KEYS, help="run only these models")
    parser.add_argument("--configs", nargs="+", choices=configs(), help="run only these configurations (+ lora_r8)")
    parser.add_argument("--steps", type=int, help="measured steps per configuration (default 3; quick 1)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps before measuring (default 1)")
    parser.add_argument(
        "--rounds",
        type=int,
        help="timing processes per configuration, in alternating order (default 2; quick 1); "
        "the step time is the median over all their steps",
    )
    parser.add_argument(
        "--shared-process",
        action="store_true",
        help="time the steps in the memory run's process (quick does; slower steps on CPU, see docstring)",
    )
    parser.add_argument("--batch", type=int, help="override every model's batch size")
    parser.add_argument("--seq", type=int, help="override every model's sequence length")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per child process")
    parser.add_argument(
        "--tag",
        help="suffix of the results files (efficiency-<device>-<dtype>-<tag>.*), so a run of a few --configs "
        "does not replace the full run's report",
    )
    parser.add_argument(
        "--report-from",
        type=Path,
        metavar="JSON",
        help="measure nothing: rebuild the .md/.png (ratios, verdicts) of a finished run's JSON, in place",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.report_from is not None:
        return rebuild_report(args.report_from)
    started = time.perf_counter()
    git_at_start = git_state()  # before the forkserver imports the package: the code measured
    device = resolve_device(args.device)
    steps = max(1, args.steps if args.steps is not None else (1 if args.quick else 3))
    warmup = max(1, args.warmup)
    separate_timing = not (args.quick or args.shared_process)
    rounds = max(1, args.rounds if args.rounds is not None else (1 if args.quick else 2))

    models = [
        spec for spec in (QUICK_MODELS if args.quick else FULL_MODELS) if not args.models or spec.key in args.models
    ]
    overrides = {k: v for k, v in (("batch", args.batch), ("seq", args.seq)) if v is not None}
    models = [dataclasses.replace(spec, **overrides) for spec in models]
    selected = list(dict.fromkeys(args.configs or configs()))
    if "lora_r8" not in selected:  # every ratio is taken against it
        selected.insert(0, "lora_r8")

    checkpoint_dirs: dict[str, str | None] = {}
    for spec in models:
        if spec.checkpoint == "smollm2":
            from harness.models import smollm2_checkpoint

            checkpoint_dirs[spec.key] = str(smollm2_checkpoint())
        else:
            checkpoint_dirs[spec.key] = None

    # Before the forkserver starts (it inherits the environment): see the module docstring.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Children fork from a server that imported the libraries but never ran an op or touched CUDA.
    context = forkserver_context(
        ["torch", "peft", "transformers", "transformers.models.llama.modeling_llama", "neuroada_plugin"]
    )
    load_start = loadavg()
    rows: list[dict[str, Any]] = []
    for spec in models:
        jobs = [
            {
                "model": dataclasses.asdict(spec),
                "checkpoint_dir": checkpoint_dirs[spec.key],
                "config": config,
                "device": str(device),
                "dtype": args.dtype,
                "steps": steps,
                "mem_steps": MEMORY_STEPS,
                "warmup": warmup,
            }
            for config in selected
        ]
        rows += run_model(context, jobs, separate_timing, rounds, args.timeout)
    add_derived(rows)

    for row in rows:  # a diverging configuration would make its timings meaningless
        if "losses" in row and not all(math.isfinite(v) for v in row["losses"]):
            row["warning"] = "non-finite loss"

    payload: dict[str, Any] = {
        "benchmark": "efficiency",
        "quick": args.quick,
        "device": str(device),
        "dtype": args.dtype,
        "command": shlex.join(["python", "benchmarks/efficiency.py", *(sys.argv[1:] if argv is None else argv)]),
        "timestamp": utc_timestamp(),
        "machine": machine_info(device),
        "git": git_at_start,
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "memory_methods": sorted({r["memory_method"] for r in rows if "memory_method" in r}),
        "steps": steps,
        "timing_rounds": rounds if separate_timing else 1,
        "memory_steps": MEMORY_STEPS,
        "warmup": warmup,
        "separate_timing_process": separate_timing,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "models": [dataclasses.asdict(spec) for spec in models],
        "configs": selected,
        "shira_r": SHIRA_R,
        "rows": rows,
        "targets": evaluate_targets(rows),
        "plot": None,
        "wall_s": 0.0,
    }
    payload["wall_s"] = time.perf_counter() - started
    stem = f"efficiency-{device.type}-{args.dtype}{'-quick' if args.quick else ''}{f'-{args.tag}' if args.tag else ''}"
    write_report(payload, models, args.output_dir, stem)
    return payload


def write_report(payload: dict[str, Any], models: list[ModelSpec], output_dir: Path, stem: str) -> None:
    """Write ``<stem>.{json,md,png}`` from ``payload`` and print the tables."""
    rows = payload["rows"]
    output_dir.mkdir(parents=True, exist_ok=True)
    plot = write_plot(rows, models, output_dir / f"{stem}.png", f"{payload['command']}  ({payload['timestamp']})")
    payload["plot"] = str(plot) if plot is not None else None
    json_path, md_path = write_results(payload, output_dir, stem, markdown_report(payload, models))

    for spec in models:
        print(f"\n## {spec.key}: {spec.label}, {spec.batch} x {spec.seq} tokens")
        print(results_table(rows, spec.key))
    print()
    print(targets_table(payload["targets"]))
    print(f"\nwrote {json_path}, {md_path}" + (f" and {plot}" if plot else ""))


def rebuild_report(json_path: Path) -> dict[str, Any]:
    """Recompute derived numbers and verdicts of a finished run's JSON and rewrite its reports.

    Measurements are taken as they are; only what this code derives from them (ratios, target
    verdicts, tables, plot) is redone, next to the JSON. The payload records when and at which
    commit the report was rebuilt.
    """
    payload = json.loads(json_path.read_text())
    rows = payload["rows"]
    for row in rows:
        if "error" not in row and "round_median_step_s" not in row:
            raise SystemExit(f"{json_path}: rows without timing rounds (written before --rounds); re-run the benchmark")
    add_derived(rows)
    payload["targets"] = evaluate_targets(rows)
    payload["report_rebuilt"] = {"timestamp": utc_timestamp(), "git": git_state()}
    models = [ModelSpec(**spec) for spec in payload["models"]]
    write_report(payload, models, json_path.parent, json_path.stem)
    return payload


if __name__ == "__main__":
    main()

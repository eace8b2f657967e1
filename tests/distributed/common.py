"""Shared by the multi-process workers (run with ``torch.distributed.run``) and the tests that launch them.

Workers write what they computed under ``--out``; the pytest process compares it with a
single-process run on the same global batch (never with something the workers computed themselves).
"""

from __future__ import annotations

import faulthandler
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
MICRO = 2  # sequences per rank and step; the global batch is WORLD * MICRO
SEQ = 16
STEPS = 3
LR = 1e-2
TOP_K = 2
VOCAB = 256


# Set by ``launch`` for the worker processes only (torchrun starts each in its own session, out of reach
# of a signal to the launcher): past this many seconds a worker dumps its stacks to stderr and exits 1.
WORKER_DEADLINE_ENV = "NEUROADA_TEST_WORKER_DEADLINE_S"
if os.environ.get(WORKER_DEADLINE_ENV):
    faulthandler.dump_traceback_later(float(os.environ[WORKER_DEADLINE_ENV]), exit=True)


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def nf4_config(quant_storage: torch.dtype):
    """The 4-bit settings of Axolotl's QLoRA (NF4, double quantization) with float32 compute, on this CPU."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=quant_storage,
    )


def zero3_config() -> dict:
    """The DeepSpeed ZeRO-3 config of the workers: every tensor partitioned (even the tiny model's small ones),
    the 16-bit weights gathered on save (what Axolotl requires), plain AdamW, no clipping."""
    return {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {
            "stage": 3,
            "stage3_gather_16bit_weights_on_model_save": True,
            "stage3_param_persistence_threshold": 0,
        },
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
    }


def peft_config():
    from neuroada_plugin import NeuroAdaConfig

    return NeuroAdaConfig(top_k=TOP_K, target_modules=TARGETS)


def neat_config():
    """NEAT with a residual pair (depth 1) and B drawn at random, so A, B, E and D all get gradients from step 1
    (A's gradient needs the whole frozen W0 in backward)."""
    from neuroada_plugin import NeatConfig

    return NeatConfig(r=4, depth=1, act_fn="silu", init_weights=False, target_modules=TARGETS)


def make_data(path: Path, seed: int = 0) -> torch.Tensor:
    """Token ids ``[STEPS, WORLD * MICRO, SEQ]`` (no padding: every rank's mean loss weighs the same)."""
    generator = torch.Generator().manual_seed(seed)
    data = torch.randint(0, VOCAB, (STEPS, WORLD * MICRO, SEQ), generator=generator)
    torch.save(data, path)
    return data


def rank_batch(data: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    return data[step, rank * MICRO : (rank + 1) * MICRO]


def save_base(path: Path, seed: int = 0) -> Path:
    """A tiny Llama with a 256-token vocabulary (random weights) saved as a checkpoint."""
    from transformers import LlamaForCausalLM

    from harness.models import tiny_llama_config

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB))
    model.save_pretrained(path)
    return path


def theta_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Theta of every layer, keyed by the layer's path below the PEFT wrappers."""
    return {_key(n): p.detach().cpu().clone() for n, p in model.named_parameters() if ".neuroada_theta." in n}


def neat_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """NEAT's trainable tensors (``neat_A``, ``neat_B``, ``neat_E``, ``neat_D``), keyed like :func:`theta_of`."""
    return {_key(n): p.detach().cpu().clone() for n, p in model.named_parameters() if ".neat_" in n}


def base_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter that is not NeuroAda's or NEAT's, keyed like :func:`theta_of`."""
    return {
        _key(n): p.detach().cpu().clone()
        for n, p in model.named_parameters()
        if ".neat_" not in n and ".neuroada_" not in n
    }


def indices_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {_key(n): b.detach().cpu().clone() for n, b in model.named_buffers() if ".neuroada_indices." in n}


def _key(name: str) -> str:
    for prefix in ("_fsdp_wrapped_module.", "module.", "_orig_mod."):
        name = name.replace(prefix, "")
    return name.removeprefix("base_model.model.")


def reference_train(base_dir: Path, data: torch.Tensor) -> tuple[dict, dict]:
    """One process, the whole global batch per step: theta and indices after STEPS AdamW steps."""
    model, _ = reference_model(base_dir, data, peft_config())
    return theta_of(model), indices_of(model)


def reference_model(
    base_dir: Path, data: torch.Tensor, config, steps: int = STEPS, quantization_config=None
) -> tuple[torch.nn.Module, list]:
    """One process, the whole global batch per step: the PEFT model after ``steps`` AdamW steps and its losses.

    Seeded like the workers (``torch.manual_seed(0)`` before loading), so randomly initialised adapter
    tensors start from the same values; ``steps=0`` gives those initial values. ``quantization_config``:
    load the base quantized (a ``BitsAndBytesConfig``), as the QLoRA workers do.
    """
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, quantization_config=quantization_config)
    model = get_peft_model(base, config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    losses = []
    for step in range(steps):
        batch = data[step]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return model, losses


def top_abs_indices(weight: torch.Tensor, k: int) -> torch.Tensor:
    """Independent reference: per-row indices of the k largest |W| (stable sort), ascending."""
    order = torch.sort(weight.abs(), dim=1, descending=True, stable=True).indices[:, :k]
    return order.sort(dim=1).values


def launch(worker: str, out: Path, *args: str, env: dict | None = None, timeout: int = 300) -> dict:
    """Run ``tests/distributed/<worker>`` on WORLD CPU processes; returns rank 0's ``result.json``.

    DeepSpeed JIT-builds a C++ op on its first ``init_distributed``; the build goes under ``out`` so that a
    lock file left by an earlier interrupted build (torch waits on it forever, silently) cannot hang the run.
    A worker still running after ``timeout`` seconds prints every thread's Python stack and exits (see
    ``WORKER_DEADLINE_ENV``), so a hang fails with where it stuck rather than with an empty timeout.
    """
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(WORLD),
        "--master_port",
        str(_free_port()),
        str(ROOT / "tests" / "distributed" / worker),
        "--out",
        str(out),
        *args,
    ]
    full_env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        WORKER_DEADLINE_ENV: str(timeout),
        "TORCH_EXTENSIONS_DIR": str(out / "torch_extensions"),
        **(env or {}),
    }
    full_env.pop("NEUROADA_PLUGIN_METHODS", None)
    try:
        done = subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=timeout + 60, cwd=ROOT)
    except subprocess.TimeoutExpired as expired:
        raise AssertionError(
            f"{worker} still running after {timeout + 60} s:\n{expired.stdout}\n{expired.stderr}"
        ) from None
    if done.returncode != 0:
        raise AssertionError(f"{worker} failed ({done.returncode}):\n{done.stdout[-6000:]}\n{done.stderr[-12000:]}")
    return json.loads((out / "result.json").read_text())


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_theta_close(actual: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """Theta of a multi-process run vs the single-process run: relative 1e-5 over all layers, and no entry
    off by more than 0.1% of one AdamW step (``LR``). Returns the relative difference.

    Per entry a relative bound would not hold: the reductions run in a different order, and Adam
    divides by ``sqrt(v)``, so an entry whose gradient is nearly zero amplifies a rounding-level
    difference (measured: one entry of 1536 off by 3.8e-6 after 3 steps, the rest below 1e-7).
    """
    assert actual.keys() == reference.keys()
    assert len(reference) > 0
    for key, value in reference.items():
        assert actual[key].shape == value.shape, key
        assert float(value.abs().max()) > 1e-3, f"{key}: theta was not trained"
        difference = float((actual[key].float() - value).abs().max())
        assert difference <= 1e-3 * LR, f"{key}: entry off by {difference:.3g}"
    flat_actual = torch.cat([actual[k].float().reshape(-1) for k in sorted(reference)])
    flat_reference = torch.cat([reference[k].reshape(-1) for k in sorted(reference)])
    relative = float((flat_actual - flat_reference).norm() / flat_reference.norm())
    assert relative < 1e-5, f"theta differs from the single-process run by {relative:.3g} (relative)"
    return relative


def write_rank_results(out: Path, rank: int, result: dict) -> None:
    """Each rank writes its result; rank 0 then writes ``result.json`` with both (what :func:`launch` reads)."""
    (out / f"result_rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()
    if rank == 0:
        other = json.loads((out / "result_rank1.json").read_text())
        (out / "result.json").write_text(json.dumps({"rank0": result, "rank1": other}))


def method_config(name: str):
    """The registered method ``name``'s data-free config on the workers' target modules (SMoA, NeFT, ...)."""
    from neuroada_plugin.registry import get_method

    return get_method(name).data_free_config(target_modules=TARGETS)


def adapter_tensors_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor (the adapter's), keyed like :func:`theta_of`."""
    return {_key(n): p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def adapter_buffers_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's persistent buffers (SMoA's orderings, NeFT's neurons, fingerprints), keyed like :func:`theta_of`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for module_name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            for name, buffer in module.named_buffers():
                if not name.startswith("base_layer."):
                    out[_key(f"{module_name}.{name}")] = buffer.detach().cpu().clone()
    return out

"""Axolotl with ``adapter: neuroada`` on a quantized base (QLoRA-style): load_in_4bit and load_in_8bit
train and save an adapter-only folder whose indices are the top-|W| of the dequantized weights, and
``merge-lora`` merges the 4-bit-trained adapter into the full-precision base exactly
(``W[i, idx] += theta``); other quantization schemes are refused naming what is supported.

The base is the tiny random Llama; training runs on the CPU (bitsandbytes 0.50's CPU kernels).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_axolotl import (
    AXOLOTL_BIN,
    AXOLOTL_PYTHON,
    CI_CONFIGS,
    _adapter_tensors,
    _dense_reference_state,
    _logged_losses,
    _run,
    _tail,
    _write_config,
    write_data_files,
)
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from harness import commonsense
from neuroada_plugin.kit.quantized import dequantize_weight

sys.path.insert(0, str(CI_CONFIGS))
import rl_data  # noqa: E402  (axolotl_configs/ci/rl_data.py: the KTO rows of tiny_kto.yml)

TOP_K = 2  # axolotl_configs/ci/tiny_sft.yml


@pytest.fixture(scope="module")
def qworkdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("axolotl-quantized")


@pytest.fixture(scope="module")
def messages_file(qworkdir) -> Path:
    questions = commonsense.make_splits(commonsense.load_questions("csqa")).train[:32]
    rows = [{"messages": row["prompt"] + row["completion"]} for row in commonsense.sft_rows(questions)]
    return commonsense.write_jsonl(rows, qworkdir / "data" / "train.messages.jsonl")


# YAML key -> (layer kind in the plugin's log line, the BitsAndBytesConfig axolotl's run used, rebuilt here)
QUANTIZED_RUNS = {
    "load_in_4bit": (
        "bnb_4bit",
        dict(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
            bnb_4bit_quant_storage=torch.bfloat16,
        ),
    ),
    "load_in_8bit": ("bnb_8bit", dict(load_in_8bit=True)),
}


@pytest.mark.parametrize("quantization", list(QUANTIZED_RUNS))
def test_quantized_sft_trains_saves_adapter_only_and_merges_into_the_full_precision_base(
    qworkdir, tiny_llama_dir, messages_file, quantization
):
    kind, settings = QUANTIZED_RUNS[quantization]
    config = _write_config(
        "tiny_sft",
        qworkdir,
        tiny_llama_dir,
        messages_file,
        max_steps=4,
        output_dir=str(qworkdir / f"out-{quantization}"),
        dataset_prepared_path=str(qworkdir / "prepared"),
        **{quantization: True},
    )
    process = _run([str(AXOLOTL_BIN), "train", str(config), "--launcher", "python"], cwd=qworkdir)
    assert process.returncode == 0, f"axolotl train ({quantization}) failed:\n{_tail(process)}"
    log = process.stdout
    assert f"quantized base for adapter: neuroada: 14 {kind} layers" in log, log[-3000:]
    assert "trainable params: 2,048" in log
    losses = _logged_losses(log)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses), log[-3000:]

    output_dir = Path(yaml.safe_load(config.read_text())["output_dir"])
    files = sorted(p.name for p in output_dir.iterdir())
    assert "adapter_model.safetensors" in files and not any(f.startswith("model") for f in files), files
    assert json.loads((output_dir / "adapter_config.json").read_text())["peft_type"] == "NEUROADA"
    adapter = _adapter_tensors(output_dir)
    assert len(adapter) == 14

    # The connections are the per-row top-|W| of the weights the run trained on (4-bit: axolotl's
    # QLoRA quantization, NF4 + double quantization + bf16 storage), loaded here independently and dequantized.
    quantized = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, device_map="cpu", quantization_config=BitsAndBytesConfig(**settings)
    )
    modules = dict(quantized.named_modules())
    for key, (theta, indices) in adapter.items():
        magnitude = dequantize_weight(modules[key.removesuffix(".weight")]).float().abs()
        chosen = magnitude.gather(1, indices.long()).sort(dim=1, descending=True).values
        assert torch.equal(chosen, magnitude.topk(TOP_K, dim=1).values), key
        assert torch.count_nonzero(theta) > 0.9 * theta.numel(), f"{key}: theta barely trained"

    if quantization != "load_in_4bit":
        return  # merge-lora forces both load_in_* off: the same unquantized path as below
    # merge-lora loads the base unquantized and merges exactly: W[i, idx] += theta, nothing else changes.
    process = _run([str(AXOLOTL_BIN), "merge-lora", str(config)], cwd=qworkdir)
    assert process.returncode == 0, f"axolotl merge-lora failed:\n{_tail(process)}"
    base = load_file(tiny_llama_dir / "model.safetensors")
    merged = load_file(output_dir / "merged" / "model.safetensors")
    reference = _dense_reference_state(base, adapter)
    assert set(merged) == set(base)
    for key, tensor in merged.items():
        assert tensor.dtype == base[key].dtype and torch.equal(tensor, reference[key]), key


_VALIDATE = """
import json, sys
from axolotl.cli.config import load_cfg
results = {}
for name, path in json.loads(sys.argv[1]).items():
    try:
        cfg = load_cfg(path)
        results[name] = {"ok": True, "load_in_4bit": bool(cfg.load_in_4bit), "load_in_8bit": bool(cfg.load_in_8bit)}
    except Exception as error:  # noqa: BLE001
        results[name] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
print("RESULTS" + json.dumps(results))
"""


def test_quantized_loading_validates_and_other_schemes_are_refused_naming_the_supported_ones(
    qworkdir, tiny_llama_dir, messages_file
):
    paths = {
        name: str(_write_config("tiny_sft", qworkdir, tiny_llama_dir, messages_file, **overrides))
        for name, overrides in {
            "4bit": {"load_in_4bit": True},
            "8bit": {"load_in_8bit": True},
            "gptq": {"gptq": True},
        }.items()
    }
    process = _run([str(AXOLOTL_PYTHON), "-c", _VALIDATE, json.dumps(paths)], cwd=qworkdir, timeout=240)
    assert process.returncode == 0, _tail(process)
    results = json.loads(process.stdout.rsplit("RESULTS", 1)[1].strip().splitlines()[0])
    assert results["4bit"] == {"ok": True, "load_in_4bit": True, "load_in_8bit": False}, results["4bit"]
    assert results["8bit"] == {"ok": True, "load_in_4bit": False, "load_in_8bit": True}, results["8bit"]
    error = results["gptq"]["error"]
    assert not results["gptq"]["ok"] and "cannot train on this quantized base model (gptq: true)" in error, error
    assert "load_in_4bit: true, load_in_8bit: true (bitsandbytes)" in error, error


# (rl mode, neuroada_theta_dtype) -> the theta dtype that must train and be saved on a 4-bit base, where TRL casts
# the trainable parameters to bf16 when it builds the DPO/KTO trainer (kit/adapter_dtype.py restores them).
RL_THETA_DTYPES = {
    ("dpo", None): torch.float32,
    ("dpo", "float32"): torch.float32,
    ("dpo", "bfloat16"): torch.bfloat16,
    ("kto", None): torch.float32,
    ("kto", "float32"): torch.float32,
}


@pytest.mark.parametrize(("rl", "theta_dtype"), list(RL_THETA_DTYPES))
def test_rl_on_a_4bit_base_trains_and_saves_the_theta_dtype_asked_for(
    qworkdir, tiny_llama_dir, train_questions_rl, rl, theta_dtype
):
    expected = RL_THETA_DTYPES[(rl, theta_dtype)]
    name = f"{rl}-{theta_dtype}"
    config = _write_config(
        f"tiny_{rl}",
        qworkdir,
        tiny_llama_dir,
        train_questions_rl[rl],
        max_steps=2,
        output_dir=str(qworkdir / f"out-rl-{name}"),
        dataset_prepared_path=str(qworkdir / f"prepared-rl-{rl}"),
        load_in_4bit=True,
        neuroada_theta_dtype=theta_dtype,
    )
    process = _run([str(AXOLOTL_BIN), "train", str(config), "--launcher", "python"], cwd=qworkdir)
    assert process.returncode == 0, f"axolotl train ({name}) failed:\n{_tail(process)}"
    assert "quantized base for adapter: neuroada: 14 bnb_4bit layers" in process.stdout, process.stdout[-3000:]
    output_dir = Path(yaml.safe_load(config.read_text())["output_dir"])
    saved = load_file(output_dir / "adapter_model.safetensors")
    thetas = {k: v for k, v in saved.items() if "neuroada_theta" in k}
    assert len(thetas) == 14 and {v.dtype for v in thetas.values()} == {expected}, {v.dtype for v in thetas.values()}
    assert json.loads((output_dir / "adapter_config.json").read_text())["theta_dtype"] == theta_dtype
    assert all(torch.count_nonzero(v) > 0 for v in thetas.values())  # it trained
    if expected == torch.float32:  # trained in float32: values a bf16 theta could not hold
        assert any(not torch.equal(v.to(torch.bfloat16).float(), v) for v in thetas.values())


@pytest.fixture(scope="module")
def train_questions_rl(qworkdir) -> dict[str, Path]:
    """Preference data files of the RL configs (the same rows as tests/test_axolotl.py's; KTO's made from them)."""
    files = write_data_files(qworkdir / "rl-data", commonsense.make_splits(commonsense.load_source("obqa")).train[:8])
    return {**files, **rl_data.write_rl_files(files["dpo"], files["dpo"].parent, "train")}


def test_neat_on_a_4bit_base_trains_and_merge_lora_equals_the_streaming_merge(
    qworkdir, tiny_llama_dir, messages_file
):
    """``adapter: neat`` with ``load_in_4bit``: NEAT's update is a function of the dequantized weight, so the saved
    adapter records Axolotl's QLoRA quantization, and both ``axolotl merge-lora`` (PEFT on the unquantized base)
    and ``neuroada-plugin merge`` compute it from the original quantized again: the same checkpoint, bit for bit."""
    import subprocess

    from test_axolotl_neat import NEAT_KEYS

    config = _write_config(
        "tiny_sft", qworkdir, tiny_llama_dir, messages_file, max_steps=3, load_in_4bit=True,
        output_dir=str(qworkdir / "out-neat-4bit"), dataset_prepared_path=str(qworkdir / "prepared"),
        **{**NEAT_KEYS, "learning_rate": 0.05},
    )  # fmt: skip
    process = _run([str(AXOLOTL_BIN), "train", str(config), "--launcher", "python"], cwd=qworkdir)
    assert process.returncode == 0, f"axolotl train (neat, 4-bit) failed:\n{_tail(process)}"
    assert "quantized base for adapter: neat: 14 bnb_4bit layers" in process.stdout, process.stdout[-3000:]
    losses = _logged_losses(process.stdout)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    output_dir = Path(yaml.safe_load(config.read_text())["output_dir"])
    (group,) = json.loads((output_dir / "adapter_config.json").read_text())["base_quantization"]
    assert len(group["modules"]) == 14
    settings = {k: v for k, v in group["settings"].items() if k != "dtype"}
    assert settings == {"kind": "bnb_4bit", "quant_type": "nf4", "blocksize": 64, "compress_statistics": True}

    process = _run([str(AXOLOTL_BIN), "merge-lora", str(config)], cwd=qworkdir)
    assert process.returncode == 0, f"axolotl merge-lora failed:\n{_tail(process)}"
    streamed = qworkdir / "neat-4bit-streamed"
    done = subprocess.run(
        [sys.executable, "-m", "neuroada_plugin", "merge", "--no-progress", "--base", str(tiny_llama_dir),
         "--adapter", str(output_dir), "--output", str(streamed)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    base = load_file(tiny_llama_dir / "model.safetensors")
    merged = load_file(output_dir / "merged" / "model.safetensors")
    expected = load_file(streamed / "model.safetensors")
    assert set(merged) == set(expected) == set(base)
    changed = 0
    for key, tensor in merged.items():
        assert torch.equal(tensor, expected[key]), key
        changed += not torch.equal(tensor, base[key])
    assert changed == 14
    assert json.loads((streamed / "merge_info.json").read_text())["update_computed_from"] == "re-quantized base"

"""`adapter: neft` in Axolotl, end to end: neft-select on the run's data, an SFT run, its saved adapter, merge-lora.

The same plugin as ``adapter: neuroada`` offers NeFT with the YAML keys ``neft_selection_file``,
``neft_selection``, ``neft_neuron_share`` ... Here the paper's rule: ``neuroada-plugin neft-select`` (main
``.venv``) picks the neurons on the very data file the Axolotl run trains on, and the CI config
``axolotl_configs/ci/tiny_sft.yml`` (NeuroAda's key swapped for ``neft_selection_file``) trains them in
``.venv-axolotl`` through the helpers of ``tests/test_axolotl.py``. This process checks the results
against references it computes itself:

* the saved neurons against the selection file, the trainable count against the neurons' sizes,
* logits of the saved adapter against a plain float64 model with ``W0 + dW`` written into its weights,
  ``dW`` from the saved tensors alone (tests/neft_reference.py),
* ``axolotl merge-lora``'s plain checkpoint against ``W0 + dW`` rounded once to float32, bit for bit.

A DPO run (``rl: dpo``) takes the data-free keys instead (``neft_selection: magnitude``, ``neft_neuron_share``):
its neurons are recomputed from the base weights, its first loss is ln 2 (no reference model is loaded).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from neft_reference import adapter_config, adapter_tensors, dense_model, magnitude_selection, merged_float, neurons
from peft import PeftModel
from safetensors.torch import load_file
from test_axolotl import (
    AXOLOTL_BIN,
    TRAIN_ROWS,
    _logged_losses,
    _probe_ids,
    _run,
    _tail,
    _write_config,
    assert_answer_loss_dropped,
    write_data_files,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from harness import commonsense
from neuroada_plugin.cli import main as plugin_main
from neuroada_plugin.kit.fingerprint import fingerprint_distance, weight_fingerprint

NEURON_SIZE = 64  # an up_proj row or a down_proj column of the tiny Llama


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("axolotl-neft")


@pytest.fixture(scope="module")
def train_questions() -> list[commonsense.MCQuestion]:
    return commonsense.make_splits(commonsense.load_questions("csqa")).train[:TRAIN_ROWS]


@pytest.fixture(scope="module")
def base_state(tiny_llama_dir) -> dict[str, torch.Tensor]:
    return load_file(tiny_llama_dir / "model.safetensors")


@pytest.fixture(scope="module")
def data_files(workdir, train_questions) -> dict[str, Path]:
    return write_data_files(workdir / "data", train_questions)


@pytest.fixture(scope="module")
def selection(workdir, tiny_llama_dir, data_files) -> dict[str, Any]:
    """``neuroada-plugin neft-select`` on the SFT data file (4 reference steps, 0.2% of all parameters)."""
    path = workdir / "neurons.json"
    args = ["neft-select", "--model", str(tiny_llama_dir), "--data", str(data_files["messages"]), "--output", str(path),
            "--steps", "4", "--batch-size", "4", "--max-length", "256", "--learning-rate", "1e-3", "--share", "0.002",
            "--no-progress", "-q"]  # fmt: skip
    assert plugin_main(args) == 0
    return json.loads(path.read_text()) | {"path": path}


@pytest.fixture(scope="module")
def neft_sft_run(workdir, tiny_llama_dir, data_files, selection) -> tuple[Path, Path, str]:
    """(config, output_dir, log) of one ``axolotl train`` with ``adapter: neft`` and the selection file."""
    output_dir = workdir / "out-neft-sft"
    keys = {"adapter": "neft", "neuroada_top_k": None, "neft_selection_file": str(selection["path"])}
    config = _write_config(
        "tiny_sft", workdir, tiny_llama_dir, data_files["messages"], output_dir=str(output_dir), **keys
    )
    process = _run([str(AXOLOTL_BIN), "train", str(config), "--launcher", "python"], cwd=workdir)
    assert process.returncode == 0, f"axolotl train (SFT, adapter: neft) failed:\n{_tail(process)}"
    return config, output_dir, process.stdout


def test_neft_sft_trains_the_selected_neurons_and_saves_adapter_only(neft_sft_run, selection, base_state):
    config_path, output_dir, log = neft_sft_run
    files = sorted(p.name for p in output_dir.iterdir())
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files, files
    assert not any(name.startswith("model") and name.endswith(".safetensors") for name in files), files
    config = adapter_config(output_dir)
    assert config["peft_type"] == "NEFT" and config["selection"] == "file", config
    assert config["selection_file"] == str(selection["path"]) and config["init_weights"] is True, config
    assert set(config["target_modules"]) == {"up_proj", "down_proj"}, config["target_modules"]

    chosen = {f"{name}.weight": (e["axis"], e["neurons"]) for name, e in selection["modules"].items() if e["neurons"]}
    assert {entry["axis"] for entry in selection["modules"].values()} == {"rows", "cols"}
    adapter = adapter_tensors(output_dir)
    assert set(adapter) == set(chosen) and len(adapter) == 4
    for key, t in adapter.items():
        axis, index = neurons(t)
        assert sorted(t) == sorted(["delta", axis, "fingerprint"]), (key, sorted(t))
        assert (axis, index.tolist()) == chosen[key] and index.dtype == torch.int64, key  # the file's neurons
        # Made from the weight Axolotl loaded (float32 here: the config sets no bf16).
        assert fingerprint_distance(t["fingerprint"], weight_fingerprint(base_state[key])) < 1e-2, key
        shape = (len(index), NEURON_SIZE) if axis == "rows" else (NEURON_SIZE, len(index))
        assert t["delta"].shape == shape and t["delta"].dtype == torch.float32, key
        assert torch.count_nonzero(t["delta"]) == t["delta"].numel(), f"{key}: delta (zero at init) did not train"
    total = NEURON_SIZE * sum(len(index) for _, index in chosen.values())
    assert total == selection["budget"]["parameters"] and f"trainable params: {total:,}" in log, log[-3000:]
    assert config["neurons_per_module"] == {
        key.removesuffix(".weight"): [axis, len(index)] for key, (axis, index) in chosen.items()
    }
    losses = _logged_losses(log)
    assert len(losses) == yaml.safe_load(config_path.read_text())["max_steps"], log[-3000:]
    assert all(math.isfinite(x) for x in losses)


def test_neft_adapter_logits_equal_dense_reference_and_lower_loss(neft_sft_run, tiny_llama_dir, train_questions):
    _, output_dir, _ = neft_sft_run
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float64), output_dir
    ).eval()  # float64: the bypass and a dense weight round differently in float32
    base_model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float64).eval()
    dense = dense_model(tiny_llama_dir, output_dir)
    ids = _probe_ids(tokenizer, train_questions)
    with torch.no_grad():
        got, want, base = (m(input_ids=ids).logits for m in (peft_model, dense, base_model))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert (got - base).abs().max() > 1e-2, "the trained update does not change the logits"

    assert_answer_loss_dropped(base_model, peft_model, tokenizer, train_questions, "NeFT adapter")


def test_neft_merge_lora_writes_plain_checkpoint_with_adapter_logits(
    neft_sft_run, workdir, tiny_llama_dir, base_state, train_questions
):
    config_path, output_dir, _ = neft_sft_run
    process = _run([str(AXOLOTL_BIN), "merge-lora", str(config_path)], cwd=workdir)
    assert process.returncode == 0, f"axolotl merge-lora (adapter: neft) failed:\n{_tail(process)}"
    merged_dir = output_dir / "merged"
    merged = load_file(merged_dir / "model.safetensors")

    # A plain checkpoint: the base model's keys, nothing of the adapter.
    assert set(merged) == set(base_state), set(merged) ^ set(base_state)
    adapter = adapter_tensors(output_dir)
    for key, tensor in merged.items():
        assert tensor.dtype == base_state[key].dtype, key
        if key in adapter:  # W0 + dW rounded once to float32: the exact merge, bit for bit
            assert torch.equal(tensor, merged_float(base_state[key], adapter[key])), key
            assert not torch.equal(tensor, base_state[key]), key
        else:
            assert torch.equal(tensor, base_state[key]), key

    # float64 logits: they differ only by the merged weights' float32 rounding.
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    merged_model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float64).eval()
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float64), output_dir
    ).eval()
    ids = _probe_ids(tokenizer, train_questions)
    with torch.no_grad():
        got, want = merged_model(input_ids=ids).logits, peft_model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


# ---------------------------------------------------------------------------------------------- DPO


def test_neft_dpo_with_magnitude_selection_first_loss_is_ln2_and_equals_dense_reference(
    workdir, tiny_llama_dir, data_files, base_state, train_questions
):
    """``rl: dpo`` with the data-free keys ``neft_selection: magnitude`` + ``neft_neuron_share``."""
    output_dir = workdir / "out-neft-dpo"
    keys = {"adapter": "neft", "neuroada_top_k": None, "neft_selection": "magnitude", "neft_neuron_share": 0.002}
    config_path = _write_config(
        "tiny_dpo", workdir, tiny_llama_dir, data_files["dpo"], output_dir=str(output_dir), **keys
    )
    process = _run([str(AXOLOTL_BIN), "train", str(config_path), "--launcher", "python"], cwd=workdir)
    assert process.returncode == 0, f"axolotl train (DPO, adapter: neft) failed:\n{_tail(process)}"
    files = sorted(p.name for p in output_dir.iterdir())
    assert not any(name.startswith("model") and name.endswith(".safetensors") for name in files), files
    config = adapter_config(output_dir)
    assert (config["peft_type"], config["selection"], config["neuron_share"]) == ("NEFT", "magnitude", 0.002), config

    # The largest-norm neurons over all four layers, recomputed from the base checkpoint.
    adapter = adapter_tensors(output_dir)
    selected = {key.removesuffix(".weight"): neurons(t) for key, t in adapter.items()}
    expected = magnitude_selection(base_state, neuron_share=0.002)
    assert {module: (axis, index.tolist()) for module, (axis, index) in selected.items()} == expected
    assert all(torch.count_nonzero(t["delta"]) == t["delta"].numel() for t in adapter.values())  # all trained

    losses = _logged_losses(process.stdout)
    assert len(losses) == yaml.safe_load(config_path.read_text())["max_steps"], _tail(process)
    # No reference model is loaded: the reference is the policy with the adapter disabled, which equals the
    # policy at step 0 (delta = 0), so the first DPO loss is exactly ln 2 (logged to 4 digits).
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4), losses
    assert losses[-1] < math.log(2), losses

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float64), output_dir
    ).eval()
    ids = _probe_ids(tokenizer, train_questions)
    with torch.no_grad():
        got, want = peft_model(input_ids=ids).logits, dense_model(tiny_llama_dir, output_dir)(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)

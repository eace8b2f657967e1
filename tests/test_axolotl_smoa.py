"""`adapter: smoa` in Axolotl, end to end: an SFT run, its saved adapter, merge-lora.

The same plugin as ``adapter: neuroada`` offers SMoA with the YAML keys ``smoa_r``, ``smoa_num_blocks``,
``smoa_alpha``, ``smoa_branch_ranks`` ... Axolotl runs in ``.venv-axolotl`` through the helpers of
``tests/test_axolotl.py`` (the CI config ``axolotl_configs/ci/tiny_sft.yml`` with the NeuroAda key
swapped for SMoA ones: two blocks of uneven ranks, scale alpha / r = 2); this process checks the results
against references it computes itself:

* the saved orderings against spectral centroids from a float64 SVD of the base checkpoint's weights,
* logits of the saved adapter against a plain float64 model with ``W0 + dW`` written into its weights,
  ``dW`` from the formula and the saved tensors alone (tests/smoa_reference.py),
* ``axolotl merge-lora``'s plain checkpoint against that dense weight and the adapter's logits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from smoa_reference import adapter_tensors, dense_delta, dense_model, group_sizes, trainable_count
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
from neuroada_plugin.kit.fingerprint import fingerprint_distance, weight_fingerprint

SMOA = dict(r=4, num_blocks=2, alpha=8.0, branch_ranks=[3, 1])
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SMOA_KEYS: dict[str, Any] = {
    "adapter": "smoa",
    "neuroada_top_k": None,  # the CI config is NeuroAda's; drop its key
    **{f"smoa_{key}": value for key, value in SMOA.items()},
    # At 0.05 the 8 steps lowered the answer loss by only 0.056-0.085 over seeds 0-3, next to the test's 0.05
    # threshold; 0.1 gives 0.16-0.21 with smoothly falling step losses.
    "learning_rate": 0.1,
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("axolotl-smoa")


@pytest.fixture(scope="module")
def train_questions() -> list[commonsense.MCQuestion]:
    return commonsense.make_splits(commonsense.load_questions("csqa")).train[:TRAIN_ROWS]


@pytest.fixture(scope="module")
def base_state(tiny_llama_dir) -> dict[str, torch.Tensor]:
    return load_file(tiny_llama_dir / "model.safetensors")


@pytest.fixture(scope="module")
def smoa_sft_run(workdir, tiny_llama_dir, train_questions) -> tuple[Path, Path, str]:
    """(config, output_dir, log) of one ``axolotl train`` with ``adapter: smoa``."""
    data = write_data_files(workdir / "data", train_questions)["messages"]
    output_dir = workdir / "out-smoa-sft"
    config = _write_config("tiny_sft", workdir, tiny_llama_dir, data, output_dir=str(output_dir), **SMOA_KEYS)
    process = _run([str(AXOLOTL_BIN), "train", str(config), "--launcher", "python"], cwd=workdir)
    assert process.returncode == 0, f"axolotl train (SFT, adapter: smoa) failed:\n{_tail(process)}"
    return config, output_dir, process.stdout


def _centroids(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Spectral centroid of every row and column: energy-weighted mean index of the singular components."""
    u, sigma, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    index = torch.arange(len(sigma), dtype=torch.float64)
    out = []
    for vectors in (u, vh.T):
        energy = (vectors * sigma).square()
        out.append((energy * index).sum(1) / energy.sum(1))
    return out[0], out[1]


def test_smoa_sft_trains_and_saves_adapter_only(smoa_sft_run, base_state):
    config_path, output_dir, log = smoa_sft_run
    files = sorted(p.name for p in output_dir.iterdir())
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files, files
    assert not any(name.startswith("model") and name.endswith(".safetensors") for name in files), files
    config = json.loads((output_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "SMOA" and {key: config[key] for key in SMOA} == SMOA, config
    assert config["num_blocks"] == 2 and config["dropout"] == 0.0 and config["init_weights"] is True, config
    assert set(config["target_modules"]) == set(PROJECTIONS), config["target_modules"]

    adapter = adapter_tensors(output_dir)
    assert len(adapter) == 7 * 2 and {k.rsplit(".", 2)[-2] for k in adapter} == set(PROJECTIONS)
    total = 0
    for key, t in adapter.items():
        out_features, in_features = base_state[key].shape
        assert sorted(t) == ["A", "B", "cols", "fingerprint", "rows"], (key, sorted(t))
        # Made from the weight Axolotl loaded (float32 here: the config sets no bf16).
        assert fingerprint_distance(t["fingerprint"], weight_fingerprint(base_state[key])) < 1e-2, key
        rows, cols = group_sizes(out_features, 2), group_sizes(in_features, 2)
        assert t["A"].shape == (3 * cols[0] + 1 * cols[1],) and t["B"].shape == (rows[0] * 3 + rows[1] * 1,), key
        assert t["A"].dtype == t["B"].dtype == torch.float32 and t["rows"].dtype == t["cols"].dtype == torch.int64
        assert torch.count_nonzero(t["B"]) > 0.9 * t["B"].numel(), f"{key}: B (zero at init) barely trained"
        # Rows and columns sorted by spectral centroid, not left in index order; the tolerance covers centroids the
        # implementation counts as tied (within q / 2**16 < 1e-3 of each other: index order) plus float32 SVD noise.
        for order, centroid in zip((t["rows"], t["cols"]), _centroids(base_state[key]), strict=True):
            assert torch.equal(order.sort().values, torch.arange(len(order))), key
            assert bool((centroid[order].diff() > -2e-3).all()) and not torch.equal(order, torch.arange(len(order)))
        total += trainable_count(out_features, in_features, config)
    assert f"trainable params: {total:,}" in log, log[-3000:]
    losses = _logged_losses(log)
    assert len(losses) == yaml.safe_load(config_path.read_text())["max_steps"], log[-3000:]
    assert all(math.isfinite(x) for x in losses)


def test_smoa_adapter_logits_equal_dense_reference_and_lower_loss(smoa_sft_run, tiny_llama_dir, train_questions):
    _, output_dir, _ = smoa_sft_run
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float64), output_dir
    ).eval()  # float64: the float32 factored forward and a float32 dense weight round differently
    base_model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float64).eval()
    dense = dense_model(tiny_llama_dir, output_dir)
    ids = _probe_ids(tokenizer, train_questions)
    with torch.no_grad():
        got, want, base = (m(input_ids=ids).logits for m in (peft_model, dense, base_model))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert (got - base).abs().max() > 1e-2, "the trained update does not change the logits"

    assert_answer_loss_dropped(base_model, peft_model, tokenizer, train_questions, "SMoA adapter")


def test_smoa_merge_lora_writes_plain_checkpoint_with_adapter_logits(
    smoa_sft_run, workdir, tiny_llama_dir, base_state, train_questions
):
    config_path, output_dir, _ = smoa_sft_run
    process = _run([str(AXOLOTL_BIN), "merge-lora", str(config_path)], cwd=workdir)
    assert process.returncode == 0, f"axolotl merge-lora (adapter: smoa) failed:\n{_tail(process)}"
    merged_dir = output_dir / "merged"
    merged = load_file(merged_dir / "model.safetensors")

    # A plain checkpoint: the base model's keys, nothing of the adapter.
    assert set(merged) == set(base_state), set(merged) ^ set(base_state)
    config = json.loads((output_dir / "adapter_config.json").read_text())
    adapter = adapter_tensors(output_dir)
    for key, tensor in merged.items():
        assert tensor.dtype == base_state[key].dtype, key
        if key in adapter:
            want = base_state[key].double() + dense_delta(base_state[key], adapter[key], config)
            torch.testing.assert_close(tensor.double(), want, rtol=0, atol=1e-6, msg=key)
            assert not torch.equal(tensor, base_state[key]), key
        else:
            assert torch.equal(tensor, base_state[key]), key

    # float64 logits: they differ only by the merged weights' float32 rounding (checked above to 1e-6).
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

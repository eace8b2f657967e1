"""SAFE in Axolotl: ``safe: true`` and the ``safe_*`` keys, for ``adapter: neuroada`` and ``adapter: lora``.

The plugin adds ``SAFECallback`` through Axolotl's ``add_callbacks_post_trainer`` hook. A real run
(the CI config ``tiny_sft`` on the tiny Llama, a checkpoint every step) must freeze a block within a
few steps; this process then checks the saved tensors: a frozen unit's adapter tensors in the
checkpoint of its freeze step are bit-identical to those of the final output, while a unit that
kept training changed. Config validation (no training) refuses bad values, misspelt keys and
``safe_*`` keys without ``safe: true``, naming the key. Axolotl runs in ``.venv-axolotl`` through
the helpers of ``tests/test_axolotl.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_axolotl import (
    _VALIDATE_SCRIPT,
    AXOLOTL_BIN,
    AXOLOTL_PYTHON,
    TRAIN_ROWS,
    _run,
    _tail,
    _write_config,
    write_data_files,
)

from harness import commonsense

MAX_STEPS = 5
# Warm-up of 1 step, one check per step until step 3, threshold 1.0 at the end: the less important of
# the tiny Llama's two blocks freezes by step 3 (at most 75% of the units, so the other keeps training).
SAFE_KEYS = dict(safe=True, safe_warmup_steps=1, safe_freeze_end_steps=3, safe_check_every=1, safe_max_threshold=1.0)
# Axolotl turns its LoRA kernels on by default; they are CUDA-only.
LORA_KEYS = dict(adapter="lora", neuroada_top_k=None, lora_r=4, lora_alpha=8, lora_target_linear=True, lora_dropout=0.0)
LORA_KEYS.update(lora_mlp_kernel=False, lora_qkv_kernel=False, lora_o_kernel=False)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("axolotl-safe")


@pytest.fixture(scope="module")
def data(workdir) -> Path:
    questions = commonsense.make_splits(commonsense.load_questions("csqa")).train[:TRAIN_ROWS]
    return write_data_files(workdir / "data", questions)["messages"]


def _unit_tensors(tensors: dict[str, torch.Tensor], unit: str) -> dict[str, torch.Tensor]:
    return {key: value for key, value in tensors.items() if key.startswith(unit + ".")}


@pytest.mark.parametrize("adapter", ["neuroada", "lora"])
def test_safe_freezes_a_block_whose_tensors_stay_bit_identical(adapter, workdir, tiny_llama_dir, data):
    out = workdir / f"out-safe-{adapter}"
    overrides = dict(SAFE_KEYS, max_steps=MAX_STEPS, save_strategy="steps", save_steps=1, output_dir=str(out))
    if adapter == "lora":
        overrides.update(LORA_KEYS)
    config = _write_config("tiny_sft", workdir, tiny_llama_dir, data, **overrides)
    process = _run([str(AXOLOTL_BIN), "train", str(config), "--launcher", "python"], cwd=workdir)
    assert process.returncode == 0, f"axolotl train (SFT, safe: true, adapter: {adapter}) failed:\n{_tail(process)}"
    assert f"[SAFE] callback added for `adapter: {adapter}`" in process.stdout, _tail(process)
    assert "[SAFE] step" in process.stdout and "froze" in process.stdout, _tail(process)

    last = out / f"checkpoint-{MAX_STEPS}"
    state = json.loads((last / "trainer_state.json").read_text())
    freeze_steps = state["stateful_callbacks"]["SAFECallback"]["attributes"]["freeze_steps"]
    assert freeze_steps, state["stateful_callbacks"]
    assert all(1 <= step <= 3 for step in freeze_steps.values()), freeze_steps

    final = load_file(out / "adapter_model.safetensors")
    units = sorted({key.split(".layers.")[0] + ".layers." + key.split(".layers.")[1].split(".")[0] for key in final})
    assert set(freeze_steps) < set(units), (freeze_steps, units)  # names are module prefixes; one keeps training
    for unit, step in freeze_steps.items():
        at_freeze = _unit_tensors(load_file(out / f"checkpoint-{step}" / "adapter_model.safetensors"), unit)
        assert at_freeze and at_freeze.keys() == _unit_tensors(final, unit).keys(), unit
        for key, value in at_freeze.items():
            assert torch.equal(value, final[key]), f"{key} changed after {unit} froze at step {step}"
    step = min(freeze_steps.values())
    at_first_freeze = load_file(out / f"checkpoint-{step}" / "adapter_model.safetensors")
    trained = [unit for unit in units if unit not in freeze_steps]
    changed = [
        key
        for unit in trained
        for key, value in _unit_tensors(final, unit).items()
        if not torch.equal(value, at_first_freeze[key])
    ]
    assert changed, f"no tensor of the units that kept training ({trained}) changed after step {step}"


INVALID = {
    "bad_value": ({"safe_max_threshold": 2}, ["safe_max_threshold", "less than or equal to 1"]),
    "not_int": ({"safe_check_every": "often"}, ["safe_check_every", "valid integer"]),
    "misspelt_field": ({"safe_max_treshold": 0.6}, ["`safe_max_treshold`", "did you mean `safe_max_threshold`"]),
    "misspelt_prefix": ({"saf_warmup_steps": 2}, ["`saf_warmup_steps`", "did you mean `safe_warmup_steps`"]),
    "cross_field": (
        {"safe_warmup_steps": 4, "safe_freeze_end_steps": 2},
        ["safe_freeze_end_steps (2) must be larger than safe_warmup_steps (4)"],
    ),
}
WITHOUT_SAFE = {
    "without_safe": ({"safe_max_threshold": 0.6}, ["`safe_max_threshold`", "Add `safe: true`"]),
    "safe_false": ({"safe": False, "safe_warmup_steps": 2}, ["`safe_warmup_steps`", "`safe:` is False"]),
}


def test_safe_keys_are_validated_naming_the_key(workdir, tiny_llama_dir, data):
    paths = {
        "valid_neuroada": _write_config("tiny_sft", workdir, tiny_llama_dir, data, **SAFE_KEYS),
        "valid_lora": _write_config("tiny_sft", workdir, tiny_llama_dir, data, **SAFE_KEYS, **LORA_KEYS),
        "valid_neat": _write_config(
            "tiny_sft", workdir, tiny_llama_dir, data, **SAFE_KEYS, adapter="neat", neuroada_top_k=None
        ),
    }
    cases = {name: (dict(SAFE_KEYS, **keys), expected) for name, (keys, expected) in INVALID.items()}
    cases.update({name: (keys, expected) for name, (keys, expected) in WITHOUT_SAFE.items()})
    for name, (keys, _) in cases.items():
        paths[name] = _write_config("tiny_sft", workdir, tiny_llama_dir, data, **keys)
    script = _VALIDATE_SCRIPT.replace(
        '"top_k": cfg.neuroada_top_k}', '"safe": cfg.safe, "max_threshold": cfg.safe_max_threshold}'
    )
    process = _run([str(AXOLOTL_PYTHON), "-c", script, json.dumps({k: str(v) for k, v in paths.items()})], workdir, 240)
    assert process.returncode == 0 and "RESULTS" in process.stdout, _tail(process)
    results = json.loads(process.stdout.split("RESULTS", 1)[1].strip().splitlines()[0])
    for name in ("valid_neuroada", "valid_lora", "valid_neat"):
        assert results[name]["ok"] and results[name]["safe"] is True, (name, results[name])
        assert results[name]["max_threshold"] == 1.0, (name, results[name])
    for name, (_, expected) in cases.items():
        result = results[name]
        assert not result["ok"], f"{name}: config was accepted"
        for fragment in expected:
            assert fragment in result["error"], f"{name}: {fragment!r} not in error:\n{result['error']}"

"""`adapter: neat` in Axolotl, end to end: SFT and DPO training, merge-lora, config validation.

The same plugin as ``adapter: neuroada`` (``plugins: [neuroada_plugin.axolotl.NeuroAdaPlugin]``)
offers NEAT with the YAML keys ``neat_r``, ``neat_depth``, ``neat_act_fn``, ``neat_scaling`` ...
Axolotl runs in ``.venv-axolotl`` through the helpers of ``tests/test_axolotl.py`` (the CI configs
of ``axolotl_configs/ci/`` with the NeuroAda keys swapped for NEAT ones); this process checks the
results against references it computes itself from the saved tensors:

* logits of the saved adapter against a dense model with ``W0 + s * B @ P(W0)`` written here in
  float64 (``P = act(A @ W0)`` with the residual encoder/decoder pairs), and against PEFT's own
  ``PeanutConfig`` model (the same method) with the saved tensors copied in,
* ``axolotl merge-lora``'s plain checkpoint against that dense weight and the adapter's logits,
* DPO's first loss against ln 2 (the reference is the policy with the adapter disabled).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from peft import PeanutConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from test_axolotl import (
    AXOLOTL_BIN,
    AXOLOTL_PYTHON,
    TRAIN_ROWS,
    _logged_losses,
    _model_with_state,
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

R, DEPTH, ACT, SCALING = 4, 1, "silu", 2.0
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NEAT_KEYS: dict[str, Any] = {
    "adapter": "neat",
    "neuroada_top_k": None,  # the CI configs are NeuroAda's; drop its key
    "neat_r": R,
    "neat_depth": DEPTH,
    "neat_act_fn": ACT,
    "neat_scaling": SCALING,
}
# The tiny Llama's dW = s * B @ P is small at init (|W0| ~ 0.02); this rate moves the answer loss by ~0.25 in
# 8 steps. At 0.05 Adam overshot: the last step sometimes threw most of the gain away (answer loss 10.73
# instead of ~10.53 from 10.77, in 1 of 5 runs on an AMD EPYC and on a CI machine); 0.02 gave 10.520-10.530.
LEARNING_RATE = 0.02


def _neat_config(name: str, workdir: Path, model_dir: Path, data: Path, **overrides: Any) -> Path:
    return _write_config(
        name, workdir, model_dir, data, output_dir=str(workdir / f"out-neat-{name}"), **{**NEAT_KEYS, **overrides}
    )


def _output_dir(config: Path) -> Path:
    return Path(yaml.safe_load(config.read_text())["output_dir"])


# ----------------------------------------------------------------------------------------------------------------
# Fixtures (the same data as tests/test_axolotl.py's, in this module's own folder)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("axolotl-neat")


@pytest.fixture(scope="module")
def train_questions() -> list[commonsense.MCQuestion]:
    return commonsense.make_splits(commonsense.load_questions("csqa")).train[:TRAIN_ROWS]


@pytest.fixture(scope="module")
def data_files(workdir, train_questions) -> dict[str, Path]:
    return write_data_files(workdir / "data", train_questions)


@pytest.fixture(scope="module")
def base_state(tiny_llama_dir) -> dict[str, torch.Tensor]:
    return load_file(tiny_llama_dir / "model.safetensors")


@pytest.fixture(scope="module")
def neat_sft_run(workdir, tiny_llama_dir, data_files) -> tuple[Path, str]:
    config = _neat_config("tiny_sft", workdir, tiny_llama_dir, data_files["messages"], learning_rate=LEARNING_RATE)
    process = _run([str(AXOLOTL_BIN), "train", str(config), "--launcher", "python"], cwd=workdir)
    assert process.returncode == 0, f"axolotl train (SFT, adapter: neat) failed:\n{_tail(process)}"
    return config, process.stdout


# ----------------------------------------------------------------------------------------------------------------
# Independent references (float64, from the saved tensors only)
# ----------------------------------------------------------------------------------------------------------------

_ACTIVATIONS = {"silu": lambda x: x * torch.sigmoid(x), "relu": lambda x: x.clamp_min(0), "tanh": torch.tanh}


def _neat_tensors(output_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Base weight key -> {"A", "B", "E", "D"} read straight from adapter_model.safetensors."""
    raw = load_file(output_dir / "adapter_model.safetensors")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in raw.items():
        module, _, name = key.removeprefix("base_model.model.").rpartition(".neat_")
        out.setdefault(f"{module}.weight", {})[name] = tensor
    return out


def _dense_neat_weight(w0: torch.Tensor, t: dict[str, torch.Tensor], act: str, scaling: float) -> torch.Tensor:
    """``W0 + s * B @ P`` in float64: ``P = act(A W0)``; per depth level an encoder, then decoders with residuals."""
    fn = _ACTIVATIONS[act]
    w = w0.double()
    p = fn(t["A"].double() @ w)  # [r, in]
    encoders = t["E"].double() if "E" in t else torch.zeros(0)
    decoders = t["D"].double() if "D" in t else torch.zeros(0)
    skips = []
    for e in encoders:
        skips.append(p)
        p = fn(e @ p)
    for d in decoders:
        p = fn(d @ p) + skips.pop()
    return w + scaling * (t["B"].double() @ p)


def _dense_state(base: dict[str, torch.Tensor], adapter: dict[str, dict[str, torch.Tensor]], config: dict) -> dict:
    """The base state with every adapted weight replaced by its float64 ``W0 + s * B @ P`` (load into a float64 model)."""
    state = {k: v.double() for k, v in base.items()}
    for key, tensors in adapter.items():
        state[key] = _dense_neat_weight(base[key], tensors, config["act_fn"], config["scaling"])
    return state


def _dense_model(model_dir: Path, base: dict[str, torch.Tensor], adapter: dict, config: dict):
    """The float64 model with NEAT's update written into the weights: the reference every logit is compared with."""
    return _model_with_state(model_dir, _dense_state(base, adapter, config), dtype=torch.float64)


def _peanut_model(model_dir: Path, adapter: dict[str, dict[str, torch.Tensor]], config: dict):
    """PEFT's own implementation of the method (``PeanutConfig``) carrying the saved values."""
    peanut = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        PeanutConfig(
            r=config["r"], depth=config["depth"], act_fn=config["act_fn"], scaling=config["scaling"],
            target_modules=list(PROJECTIONS),
        ),
    )  # fmt: skip
    modules = dict(peanut.base_model.model.named_modules())
    with torch.no_grad():
        for key, t in adapter.items():
            layer = modules[key.removesuffix(".weight")]
            layer.peanut_A["default"].weight.copy_(t["A"])
            layer.peanut_B["default"].weight.copy_(t["B"])
            for level in range(config["depth"]):
                layer.peanut_encoders["default"][level].weight.copy_(t["E"][level])
                layer.peanut_decoders["default"][level].weight.copy_(t["D"][level])
    return peanut.eval()


def _load_adapter(model_dir: Path, output_dir: Path):
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), output_dir)


def _check_neat_output(output_dir: Path, base: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Adapter-only PEFT files, NEAT's config with the YAML values, neat_* tensors of the right shapes, B trained."""
    files = sorted(p.name for p in output_dir.iterdir())
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files, files
    assert not any(name.startswith("model") and name.endswith(".safetensors") for name in files), files
    config = json.loads((output_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "NEAT", config
    assert (config["r"], config["depth"], config["act_fn"], config["scaling"]) == (R, DEPTH, ACT, SCALING), config
    assert set(config["target_modules"]) == set(PROJECTIONS), config["target_modules"]

    raw = load_file(output_dir / "adapter_model.safetensors")
    assert all(".neat_" in key for key in raw), [k for k in raw if ".neat_" not in k]
    adapter = _neat_tensors(output_dir)
    assert len(adapter) == 7 * 2 and {k.rsplit(".", 2)[-2] for k in adapter} == set(PROJECTIONS)
    for key, t in adapter.items():
        out = base[key].shape[0]
        assert sorted(t) == ["A", "B", "D", "E", "fingerprint"], (key, sorted(t))
        fingerprint = t.pop("fingerprint")  # of the base weight the adapter was created on
        assert fingerprint_distance(fingerprint, weight_fingerprint(base[key])) < 1e-2, key  # dtype Axolotl loaded
        assert t["A"].shape == (R, out) and t["B"].shape == (out, R), key
        assert t["E"].shape == t["D"].shape == (DEPTH, R, R), key
        assert all(v.dtype == torch.float32 for v in t.values()), key
        assert torch.count_nonzero(t["B"]) > 0.9 * t["B"].numel(), f"{key}: B (zero at init) barely trained"
    return adapter


# ----------------------------------------------------------------------------------------------------------------
# SFT
# ----------------------------------------------------------------------------------------------------------------


def test_neat_sft_trains_and_saves_adapter_only(neat_sft_run, base_state):
    config, log = neat_sft_run
    _check_neat_output(_output_dir(config), base_state)
    # Per layer: q/o/down (out 64), k/v (out 32), gate/up (out 128): A + B = 2*r*out, E + D = 2*depth*r*r.
    per_layer = sum(2 * R * out + 2 * DEPTH * R * R for out in (64, 32, 32, 64, 128, 128, 64))
    assert f"trainable params: {2 * per_layer:,}" in log, log[-3000:]
    losses = _logged_losses(log)
    assert len(losses) == yaml.safe_load(config.read_text())["max_steps"], log[-3000:]
    assert all(math.isfinite(x) for x in losses)


def test_the_same_yaml_trains_the_same_neat_adapter(neat_sft_run, workdir):
    """NEAT draws ``A`` at random: the plugin seeds it with the YAML's ``seed``, so a rerun is bit-identical.

    Axolotl itself seeds only when it builds the trainer, after the adapter exists; before the plugin
    seeded, two runs of one YAML started from different ``A`` and ended ~0.03 apart in answer loss.
    Same machine, same environment, so the comparison is exact.
    """
    config, _ = neat_sft_run
    rerun = yaml.safe_load(config.read_text())
    rerun["output_dir"] = str(workdir / "out-neat-tiny_sft-rerun")
    rerun_config = workdir / "tiny_sft-rerun.yml"
    rerun_config.write_text(yaml.safe_dump(rerun, sort_keys=False))
    process = _run([str(AXOLOTL_BIN), "train", str(rerun_config), "--launcher", "python"], cwd=workdir)
    assert process.returncode == 0, f"axolotl train (SFT rerun, adapter: neat) failed:\n{_tail(process)}"
    first = load_file(_output_dir(config) / "adapter_model.safetensors")
    second = load_file(Path(rerun["output_dir"]) / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    differing = [key for key in first if not torch.equal(first[key], second[key])]
    assert not differing, f"{len(differing)} of {len(first)} tensors differ between two runs of one YAML: {differing[:3]}"


def test_neat_adapter_logits_equal_dense_reference_and_peanut(
    neat_sft_run, tiny_llama_dir, base_state, train_questions
):
    config, _ = neat_sft_run
    output_dir = _output_dir(config)
    saved_config = json.loads((output_dir / "adapter_config.json").read_text())
    adapter = _neat_tensors(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    peft_model = _load_adapter(tiny_llama_dir, output_dir).eval()
    # The frozen base weights are bit-identical to the checkpoint's.
    for name, param in peft_model.named_parameters():
        if name.endswith("base_layer.weight"):
            key = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(param, base_state[key]), name

    # Logits in float64 (the adapter's tensors and the base widened exactly): in float32 the factored
    # forward and the dense weight round differently, by up to ~2e-5 on these logits depending on the
    # trained values, which made a float32 comparison at 1e-5 flaky.
    ids = _probe_ids(tokenizer, train_questions)
    peft_model = peft_model.double()
    dense = _dense_model(tiny_llama_dir, base_state, adapter, saved_config)
    peanut = _peanut_model(tiny_llama_dir, adapter, saved_config).double()
    base_model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        got = peft_model(input_ids=ids).logits
        dense_logits, peanut_logits, base_logits = (m(input_ids=ids).logits for m in (dense, peanut, base_model))
    torch.testing.assert_close(got, dense_logits, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got, peanut_logits, rtol=1e-9, atol=1e-9)
    assert (got - base_logits).abs().max() > 1e-2, "the trained update does not change the logits"

    assert_answer_loss_dropped(base_model, peft_model, tokenizer, train_questions, "NEAT adapter")


def test_neat_merge_lora_writes_plain_checkpoint_with_adapter_logits(
    neat_sft_run, workdir, tiny_llama_dir, base_state, train_questions
):
    config, _ = neat_sft_run
    output_dir = _output_dir(config)
    process = _run([str(AXOLOTL_BIN), "merge-lora", str(config)], cwd=workdir)
    assert process.returncode == 0, f"axolotl merge-lora (adapter: neat) failed:\n{_tail(process)}"
    merged_dir = output_dir / "merged"
    merged = load_file(merged_dir / "model.safetensors")

    # A plain checkpoint: the base model's keys, nothing of the adapter.
    assert set(merged) == set(base_state), set(merged) ^ set(base_state)
    saved_config = json.loads((output_dir / "adapter_config.json").read_text())
    adapter = _neat_tensors(output_dir)
    for key, tensor in merged.items():
        assert tensor.dtype == base_state[key].dtype, key
        if key in adapter:
            want = _dense_neat_weight(base_state[key], adapter[key], ACT, SCALING)
            torch.testing.assert_close(tensor.double(), want, rtol=0, atol=1e-6, msg=key)
            assert not torch.equal(tensor, base_state[key]), key
        else:
            assert torch.equal(tensor, base_state[key]), key

    # Logits computed in float64, so they differ only by the merged weights' float32 rounding (the merge
    # itself is checked entry by entry above, to 1e-6): measured 8e-7 to 1.5e-5 on these logits across
    # runs (the trained values differ), hence 1e-4 here.
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    merged_model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float64).eval()
    peft_model = _load_adapter(tiny_llama_dir, output_dir).eval().double()
    dense = _dense_model(tiny_llama_dir, base_state, adapter, saved_config)
    ids = _probe_ids(tokenizer, train_questions)
    with torch.no_grad():
        got, want = merged_model(input_ids=ids).logits, peft_model(input_ids=ids).logits
        torch.testing.assert_close(got, dense(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


# ----------------------------------------------------------------------------------------------------------------
# DPO
# ----------------------------------------------------------------------------------------------------------------


def test_neat_dpo_first_loss_is_ln2_with_adapter_disabled_reference(
    workdir, tiny_llama_dir, data_files, base_state, train_questions
):
    config = _neat_config("tiny_dpo", workdir, tiny_llama_dir, data_files["dpo"], learning_rate=LEARNING_RATE)
    process = _run([str(AXOLOTL_BIN), "train", str(config), "--launcher", "python"], cwd=workdir)
    assert process.returncode == 0, f"axolotl train (DPO, adapter: neat) failed:\n{_tail(process)}"
    output_dir = _output_dir(config)
    adapter = _check_neat_output(output_dir, base_state)

    losses = _logged_losses(process.stdout)
    assert len(losses) == yaml.safe_load(config.read_text())["max_steps"]
    # No reference model: TRL disables the adapter; B = 0 at init makes the policy equal it at step 0.
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4), losses
    assert any(abs(x - math.log(2)) > 1e-3 for x in losses[1:]), f"DPO never moved off ln 2: {losses}"

    saved_config = json.loads((output_dir / "adapter_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    peft_model = _load_adapter(tiny_llama_dir, output_dir).eval().double()  # float64, as above
    dense = _dense_model(tiny_llama_dir, base_state, adapter, saved_config)
    ids = _probe_ids(tokenizer, train_questions)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# Validation: bad NEAT values fail while the config is read, with the key named
# ----------------------------------------------------------------------------------------------------------------

INVALID_NEAT: dict[str, tuple[dict[str, Any], list[str]]] = {
    "r_zero": ({"neat_r": 0}, ["neat_r", "greater than or equal to 1"]),
    "r_not_int": ({"neat_r": "four"}, ["neat_r", "valid integer"]),
    "depth_negative": ({"neat_depth": -1}, ["neat_depth", "greater than or equal to 0"]),
    "act_fn": ({"neat_act_fn": "swishy"}, ["neat_act_fn must be one of", "'silu'", "'swishy'"]),
    "scaling_nan": ({"neat_scaling": float("nan")}, ["neat_scaling must be finite"]),
    "typo": ({"neat_rank": 4}, ["Unknown neat_* key", "`neat_rank`", "did you mean `neat_r`"]),
    "lora_keys": ({"lora_r": 8}, ["LoRA-only setting", "`lora_r` (use `neat_r`)", "adapter: neat"]),
    "prefix_typo": ({"nat_r": 4}, ["`nat_r` is not a key of Axolotl", "did you mean `neat_r`? Write `neat_r: 4`"]),
    "bare_field": ({"depth": 2}, ["`depth` is not an Axolotl key", "did you mean `neat_depth`? Write `neat_depth: 2`"]),
    # An Axolotl key two edits from a NEAT key is Axolotl's: refused as LoRA-only, never as a misspelling.
    "axolotl_key": (
        {"peft_layers_pattern": "layers"},
        ["LoRA-only setting", "`peft_layers_pattern` (use `neat_layers_pattern`)"],
    ),
    "keys_without_adapter": ({"adapter": "neuroada", "neuroada_top_k": 2}, ["neat_r", "set, but `adapter:` is"]),
}

_VALIDATE_SCRIPT = """
import json, sys
from axolotl.cli.config import load_cfg
results = {}
for name, path in json.loads(sys.argv[1]).items():
    try:
        cfg = load_cfg(path)
        results[name] = {"ok": True, "adapter": cfg.adapter, "merge_method": cfg.merge_method,
                         "neat": [cfg.neat_r, cfg.neat_depth, cfg.neat_act_fn, cfg.neat_scaling]}
    except Exception as error:  # noqa: BLE001
        results[name] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
print("RESULTS" + json.dumps(results))
"""


def test_invalid_neat_settings_fail_at_config_validation(workdir, tiny_llama_dir, data_files):
    data = data_files["messages"]
    paths = {"valid": str(_neat_config("tiny_sft", workdir, tiny_llama_dir, data))}
    for name, (overrides, _) in INVALID_NEAT.items():
        paths[name] = str(_neat_config("tiny_sft", workdir, tiny_llama_dir, data, **overrides))
    process = _run([str(AXOLOTL_PYTHON), "-c", _VALIDATE_SCRIPT, json.dumps(paths)], cwd=workdir, timeout=240)
    assert process.returncode == 0 and "RESULTS" in process.stdout, _tail(process)
    results = json.loads(process.stdout.split("RESULTS", 1)[1].strip().splitlines()[0])

    assert results["valid"] == {
        "ok": True, "adapter": "neat", "merge_method": "legacy", "neat": [R, DEPTH, ACT, SCALING]
    }, results["valid"]  # fmt: skip
    for name, (_, expected) in INVALID_NEAT.items():
        result = results[name]
        assert not result["ok"], f"{name}: config was accepted"
        for fragment in expected:
            assert fragment in result["error"], f"{name}: {fragment!r} not in error:\n{result['error']}"

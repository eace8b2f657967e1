"""TRL trainers with NeFT (NeftConfig) on the tiny Llama, against the official NeFT recipe: masked dense training.

The NeFT authors train the dense ``up_proj`` / ``down_proj`` weights and multiply their gradients by a 0/1
mask of the selected rows / columns, with AdamW and no weight decay. A masked gradient is zero, Adam leaves
an entry with zero gradient exactly where it is, and the gradient norm (``max_grad_norm``) is the norm of the
selected entries' gradients: so a plain-model ``SFTTrainer`` / ``DPOTrainer`` run in which every parameter is
frozen except the targeted weights, each with a gradient hook multiplying by its mask, is an independent
oracle for a whole NeFT run: same losses at every step, and its trained weights equal the NeFT adapter merged.
Both run in float64 (as tests/test_trl_neat.py's PEANuT comparison), so only the order of roundings differs.

The neurons come from ``neuroada-plugin neft-select`` (the paper's rule, run once for the module on the
training rows) for SFT, and from the data-free ``selection="magnitude"`` rule, recomputed here from the base
weights (tests/neft_reference.py), for DPO. The example scripts run ``--method neft`` with both; what they
train is checked against the dense float64 formula of tests/neft_reference.py written into a plain model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from neft_reference import adapter_tensors, dense_delta, dense_model, magnitude_selection, neuron_mask, neurons
from peft import PeftModel
from safetensors.torch import load_file
from test_trl_neat import TOKENS, _common_args, _losses, _run_example
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from harness import commonsense as cs
from neuroada_plugin.cli import main as plugin_main
from neuroada_plugin.kit.fingerprint import weight_fingerprint
from neuroada_plugin.neft import NeftConfig

ORACLE_DTYPE = torch.float64
NEURON_SIZE = 64  # every candidate neuron of the tiny Llama: an up_proj row [64] or a down_proj column [64]


def _load(model_dir: Path, dtype: torch.dtype = ORACLE_DTYPE):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)


def _neft_layers(model) -> dict[str, torch.nn.Module]:
    """Adapted layers by base-model module name (``model.layers.0.mlp.up_proj``)."""
    return {
        n.removeprefix("base_model.model."): m
        for n, m in model.named_modules()
        if hasattr(m, "neft_delta") and "default" in m.neft_delta
    }


def _selected(model) -> dict[str, tuple[str, list[int]]]:
    out = {}
    for name, layer in _neft_layers(model).items():
        axis = "rows" if "default" in layer.neft_rows else "cols"
        out[name] = (axis, getattr(layer, f"neft_{axis}")["default"].tolist())
    return out


def _masked_dense(model, selected: dict[str, tuple[str, list[int]]]):
    """The official recipe on a plain model: only the targeted weights train, their gradients masked to the neurons."""
    model.requires_grad_(False)
    for name, (axis, index) in selected.items():
        weight = model.get_submodule(name).weight
        mask = neuron_mask(tuple(weight.shape), axis, index).to(weight.dtype)
        weight.requires_grad_(True)
        weight.register_hook(lambda grad, mask=mask: grad * mask)
    return model


def _assert_merged_equals_masked_dense(neft_trainer, dense_trainer, base_state: dict[str, torch.Tensor]) -> None:
    """NeFT's trained weights == the masked dense run's, entry for entry; exactly the selected neurons moved.

    ``W0 + dW`` (float64, tests/neft_reference.py) is compared to float64 rounding; the adapter merged by
    ``merge_and_unload`` to float32 rounding: NeFT's merge forms ``W + delta`` in float32 whatever the weight's
    dtype (``neuroada_plugin/neft/functional.py``, ``add_neurons``), so a float64 base is merged at float32
    precision (the second, looser tolerance below).
    """
    selected = _selected(neft_trainer.model)
    trainable = {n for n, p in neft_trainer.model.named_parameters() if p.requires_grad}
    assert trainable == {f"base_model.model.{n}.neft_delta.default" for n in selected}, sorted(trainable)[:5]
    deltas = {
        name: layer.neft_delta["default"].detach().clone() for name, layer in _neft_layers(neft_trainer.model).items()
    }
    assert all(delta.dtype == ORACLE_DTYPE for delta in deltas.values())
    merged = neft_trainer.model.merge_and_unload().state_dict()
    dense = dense_trainer.model.state_dict()
    assert set(merged) == set(dense)
    for key, base in base_state.items():
        module, w0 = key.removesuffix(".weight"), base.to(ORACLE_DTYPE)
        if module not in selected:
            assert torch.equal(merged[key], w0), f"{key} changed"
            assert torch.equal(dense[key], w0), f"{key} changed in the dense run"
            continue
        axis, index = selected[module]
        mask = neuron_mask(tuple(base.shape), axis, index)
        # Every entry of every selected neuron moved, nothing else: in the merged adapter and in the oracle.
        assert torch.equal(merged[key] != w0, mask), key
        assert torch.equal(dense[key] != w0, mask), key
        moved = (dense[key] - w0).abs()[mask]
        # The updates reach > 1e-3 (checked here), far above both tolerances.
        assert moved.max() > 1e-3, f"{key} barely trained: the comparison would say little"
        exact = w0 + dense_delta(tuple(base.shape), {"delta": deltas[module], axis: torch.tensor(index)})
        torch.testing.assert_close(exact, dense[key], rtol=1e-9, atol=1e-12, msg=key)
        torch.testing.assert_close(merged[key], dense[key], rtol=0, atol=1e-8, msg=key)


# ------------------------------------------------------------------------------------------ selection


@pytest.fixture(scope="module")
def selection(tmp_path_factory, tiny_llama_dir) -> Path:
    """``neuroada-plugin neft-select`` on the SFT training rows: 3 reference steps, budget 0.2% of all parameters."""
    root = tmp_path_factory.mktemp("trl-neft-select")
    data = cs.write_jsonl(cs.sft_rows(cs.make_splits(cs.load_source("csqa")).train[:8]), root / "train.jsonl")
    args = ["neft-select", "--model", str(tiny_llama_dir), "--data", str(data), "--output", str(root / "neurons.json"),
            "--steps", "3", "--batch-size", "4", "--max-length", "128", "--learning-rate", "1e-3", "--share", "0.002",
            "--no-progress", "-q"]  # fmt: skip
    assert plugin_main(args) == 0
    return root / "neurons.json"


def _file_neurons(path: Path) -> dict[str, tuple[str, list[int]]]:
    modules = json.loads(path.read_text())["modules"]
    return {name: (entry["axis"], entry["neurons"]) for name, entry in modules.items() if entry["neurons"]}


# ---------------------------------------------------------------------------------------------- SFT


def _sft_trainer(model, model_dir: Path, output_dir: Path, rows: list[dict], peft_config=None) -> SFTTrainer:
    return SFTTrainer(
        model=model,
        args=SFTConfig(**_common_args(output_dir), learning_rate=1e-2),
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=peft_config,
    )


def test_sft_with_a_neft_select_file_trains_exactly_like_masked_dense_finetuning(selection, tiny_llama_dir, tmp_path):
    rows = cs.sft_rows(cs.make_splits(cs.load_source("csqa")).train[:4])
    base_state = load_file(tiny_llama_dir / "model.safetensors")
    config = NeftConfig(selection_file=str(selection))
    neft = _sft_trainer(_load(tiny_llama_dir), tiny_llama_dir, tmp_path / "neft", rows, config)
    chosen = _selected(neft.model)
    assert chosen == _file_neurons(selection)  # the file's neurons, layer for layer, through TRL
    assert {axis for axis, _ in chosen.values()} == {"rows", "cols"} and len(chosen) == 4
    dense = _sft_trainer(_masked_dense(_load(tiny_llama_dir), chosen), tiny_llama_dir, tmp_path / "dense", rows)

    neft.train()
    dense.train()
    losses, expected = _losses(neft), _losses(dense)
    assert len(losses) == len(expected) == 4
    assert losses == pytest.approx(expected, rel=1e-9, abs=0)
    assert losses[-1] < losses[0], losses  # training did something the oracle also did

    out = tmp_path / "adapter"
    neft.save_model(out)
    saved_config = json.loads((out / "adapter_config.json").read_text())
    assert saved_config["peft_type"] == "NEFT" and saved_config["selection"] == "file"
    assert saved_config["selection_file"] == str(selection)
    # The shapes are saved with the adapter, so loading never needs the file.
    assert saved_config["neurons_per_module"] == {name: [axis, len(index)] for name, (axis, index) in chosen.items()}
    saved = adapter_tensors(out)
    assert set(saved) == {f"{name}.weight" for name in chosen}
    for key, tensors in saved.items():
        axis, index = neurons(tensors)
        assert sorted(tensors) == sorted(["delta", axis, "fingerprint"]) and index.dtype == torch.int64
        assert (axis, index.tolist()) == chosen[key.removesuffix(".weight")], key
        assert torch.equal(tensors["fingerprint"], weight_fingerprint(base_state[key].to(ORACLE_DTYPE))), key
        shape = (len(index), NEURON_SIZE) if axis == "rows" else (NEURON_SIZE, len(index))
        assert tensors["delta"].shape == shape and tensors["delta"].dtype == ORACLE_DTYPE, key

    neft.model.eval()
    with torch.no_grad():
        trained_logits = neft.model(input_ids=torch.tensor(TOKENS)).logits
        reloaded = PeftModel.from_pretrained(_load(tiny_llama_dir), out).eval()
        assert torch.equal(reloaded(input_ids=torch.tensor(TOKENS)).logits, trained_logits)
    _assert_merged_equals_masked_dense(neft, dense, base_state)


# ---------------------------------------------------------------------------------------------- DPO


def _dpo_trainer(model, model_dir: Path, output_dir: Path, peft_config=None, ref_model=None) -> DPOTrainer:
    questions = cs.make_splits(cs.load_source("obqa")).train[:4]
    return DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=DPOConfig(**_common_args(output_dir), learning_rate=1e-2, beta=0.1),
        train_dataset=Dataset.from_list(cs.dpo_rows(questions)),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=peft_config,
    )


def test_dpo_with_magnitude_selection_first_loss_is_ln2_and_training_equals_masked_dense(tiny_llama_dir, tmp_path):
    base_state = load_file(tiny_llama_dir / "model.safetensors")
    config = NeftConfig(selection="magnitude", neuron_share=0.002)
    neft = _dpo_trainer(_load(tiny_llama_dir), tiny_llama_dir, tmp_path / "neft", config)
    # No second model: the reference is the policy with its adapter disabled.
    assert neft.ref_model is None
    chosen = _selected(neft.model)
    assert chosen == magnitude_selection(base_state, neuron_share=0.002)  # recomputed from the weights
    # The oracle's reference is the frozen base model, loaded separately.
    dense = _dpo_trainer(
        _masked_dense(_load(tiny_llama_dir), chosen),
        tiny_llama_dir,
        tmp_path / "dense",
        ref_model=_load(tiny_llama_dir),
    )

    neft.train()
    dense.train()
    logs = [e for e in neft.state.log_history if "loss" in e]
    expected = [e for e in dense.state.log_history if "loss" in e]
    assert len(logs) == len(expected) == 4
    # Step 1: delta = 0, so policy == reference: every log-ratio is 0 and the loss is -log(sigmoid(0)) = ln 2.
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert logs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-7)
    assert [e["loss"] for e in logs] == pytest.approx([e["loss"] for e in expected], rel=1e-9, abs=0)
    assert [e["rewards/margins"] for e in logs] == pytest.approx(
        [e["rewards/margins"] for e in expected], rel=1e-7, abs=1e-12
    )
    assert logs[-1]["loss"] < math.log(2) - 1e-2 and logs[-1]["rewards/margins"] > 0
    _assert_merged_equals_masked_dense(neft, dense, base_state)


# ---------------------------------------------------------------------------------- example scripts


@pytest.mark.parametrize(
    ("script", "trainer_class", "sources"),
    [("sft", "SFTTrainer", "csqa"), ("dpo", "DPOTrainer", "obqa")],
    ids=["sft-selection-file", "dpo-magnitude"],
)
def test_example_script_with_method_neft(
    selection, tiny_llama_dir, tmp_path, capsys, monkeypatch, script, trainer_class, sources
):
    base_state = load_file(tiny_llama_dir / "model.safetensors")
    if script == "sft":  # the paper's rule: the file neft-select wrote
        flags = {"selection_file": str(selection)}
        expected = _file_neurons(selection)
    else:  # data-free, a neuron count, and gate_proj's rows as candidates too (list-valued flag)
        flags = {"selection": "magnitude", "num_neurons": 40, "target_modules": ["gate_proj", "up_proj", "down_proj"]}
        expected = magnitude_selection(base_state, num_neurons=40, targets=("gate_proj", "up_proj", "down_proj"))
        assert {name.rsplit(".", 1)[1] for name in expected} == {"gate_proj", "up_proj", "down_proj"}
    out = tmp_path / "out"
    argv = ["--method", "neft", "--model_name_or_path", str(tiny_llama_dir), "--dtype", "float32"]
    argv += ["--sources", sources, "--train_size", "4", "--eval_size", "4", "--output_dir", str(out)]
    argv += ["--max_steps", "2", "--per_device_train_batch_size", "2", "--logging_steps", "1", "--disable_tqdm", "true"]
    for key, value in flags.items():
        argv += [f"--neft_{key}", *map(str, value if isinstance(value, list) else [value])]
    trainer = _run_example(script, trainer_class, argv, monkeypatch)
    printed = capsys.readouterr().out

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "NEFT" and config["init_weights"] is True
    for key, value in flags.items():  # PEFT saves target_modules as a set: compared as one
        assert (set(config[key]) if isinstance(value, list) else config[key]) == (
            set(value) if isinstance(value, list) else value
        ), key
    assert set(config["target_modules"]) == set(flags.get("target_modules", ["up_proj", "down_proj"]))
    assert config["selection"] == flags.get("selection", "file") and config["column_modules"] == ["down_proj"]
    assert _selected(trainer.model) == expected
    expected_trainable = NEURON_SIZE * sum(len(index) for _, index in expected.values())
    assert sum(p.numel() for p in trainer.model.parameters() if p.requires_grad) == expected_trainable
    assert f"trainable parameters: {expected_trainable:,} of" in printed
    assert f"adapter saved to: {out.resolve()}" in printed

    losses = _losses(trainer)
    assert len(losses) == 2
    if script == "dpo":
        assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # delta = 0: policy == reference at step 1
    model = trainer.model.eval()
    deltas = [layer.neft_delta["default"] for layer in _neft_layers(model).values()]
    assert len(deltas) == len(expected) and all(bool((d != 0).all()) for d in deltas)  # zero at the start: trained
    assert not any(m.merged for m in _neft_layers(model).values())  # the merged evaluation was undone

    with torch.no_grad():
        trained_logits = model(input_ids=torch.tensor(TOKENS)).logits
        reloaded = PeftModel.from_pretrained(_load(tiny_llama_dir, torch.float32), out).eval()
        assert torch.equal(reloaded(input_ids=torch.tensor(TOKENS)).logits, trained_logits)
        # The saved adapter computes the dense float64 formula (both sides in float64).
        got = PeftModel.from_pretrained(_load(tiny_llama_dir), out).eval()(input_ids=torch.tensor(TOKENS)).logits
        want = dense_model(tiny_llama_dir, out)(input_ids=torch.tensor(TOKENS)).logits
        base = _load(tiny_llama_dir).eval()(input_ids=torch.tensor(TOKENS)).logits
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert (want - base).abs().max() > 1e-4, "the trained update does not change the logits: the check says little"
    # The script's printed held-out score is the reloaded adapter's, scored independently here.
    heldout = cs.make_splits(cs.load_questions(sources)).heldout[:4]
    after = cs.evaluate_multiple_choice(reloaded, AutoTokenizer.from_pretrained(tiny_llama_dir), heldout)
    assert f"[after] held-out {after.summary()}" in printed

"""TRL trainers with NEAT (NeatConfig) on the tiny Llama, against PEFT's PEANuT trained from the same values.

NEAT is numerically PEFT's PEANuT (``peft.tuners.peanut``) computed on the transposed side, so a
PeanutConfig run whose adapter starts from NEAT's initial values is an independent oracle for a
whole training run: same losses at every step, same trained tensors. The oracle runs compute in float64:
the claim is equality of the method, and in float32 the two factorisations round differently by CPU
(Adam's normalisation turns that rounding into visible differences for entries with tiny gradients). Layouts: NEAT's
``neat_A [r, out]`` / ``neat_B [out, r]`` are PEANuT's ``peanut_A.weight`` (``nn.Linear(out, r)``) /
``peanut_B.weight`` (``nn.Linear(r, out)``) as they are; ``neat_E`` / ``neat_D [depth, r, r]`` are
PEANuT's ``peanut_encoders`` / ``peanut_decoders`` weights stacked.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import PeanutConfig, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from harness import commonsense as cs
from neuroada_plugin.kit.fingerprint import weight_fingerprint
from neuroada_plugin.neat import NeatConfig

ROOT = Path(__file__).resolve().parent.parent
# Both methods get the targets spelled out: PEANuT's default for Llama is q_proj/v_proj only.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OUT_FEATURES = {
    "q_proj": 64,
    "k_proj": 32,
    "v_proj": 32,
    "o_proj": 64,
    "gate_proj": 128,
    "up_proj": 128,
    "down_proj": 64,
}
TOKENS = [[1, 523, 9861, 30, 2, 17, 42, 4096], [5, 17, 99, 1024, 7, 3, 250, 480]]


# NEAT vs PEANuT runs: float64, so that the only difference left is the order of float64 roundings.
ORACLE_DTYPE = torch.float64


def _load(model_dir: Path, dtype: torch.dtype = torch.float32):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)


def _common_args(output_dir: Path) -> dict:
    return dict(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=2,  # 4 rows: two batches, their order drawn from the seed
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        gradient_checkpointing=False,
        bf16=False,
        max_length=128,
        seed=0,
        disable_tqdm=True,
    )


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _neat_layers(model) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if hasattr(m, "neat_A") and "default" in m.neat_A}


def _peanut_tensors(layer) -> dict[str, torch.Tensor]:
    """PEANuT's adapter tensors of one layer in NEAT's names and layout."""
    tensors = {"neat_A": layer.peanut_A["default"].weight, "neat_B": layer.peanut_B["default"].weight}
    if len(layer.peanut_encoders["default"]):
        tensors["neat_E"] = torch.stack([m.weight for m in layer.peanut_encoders["default"]])
        tensors["neat_D"] = torch.stack([m.weight for m in layer.peanut_decoders["default"]])
    return tensors


def _neat_tensors(layer) -> dict[str, torch.Tensor]:
    names = ["neat_A", "neat_B"] + (["neat_E", "neat_D"] if "default" in layer.neat_E else [])
    return {name: getattr(layer, name)["default"] for name in names}


def _copy_neat_into_peanut(neat_model, peanut_model) -> None:
    """Start PEANuT from NEAT's (random) initial adapter values, so both runs begin identical."""
    neat_layers = _neat_layers(neat_model)
    peanut_layers = {
        n: m for n, m in peanut_model.named_modules() if hasattr(m, "peanut_A") and "default" in m.peanut_A
    }
    assert set(neat_layers) == set(peanut_layers) and len(neat_layers) == 2 * len(TARGETS)
    with torch.no_grad():
        for name, layer in peanut_layers.items():
            source = _neat_tensors(neat_layers[name])
            assert source["neat_A"].shape == layer.peanut_A["default"].weight.shape
            assert source["neat_B"].shape == layer.peanut_B["default"].weight.shape
            layer.peanut_A["default"].weight.copy_(source["neat_A"])
            layer.peanut_B["default"].weight.copy_(source["neat_B"])
            for key, modules in (("neat_E", layer.peanut_encoders), ("neat_D", layer.peanut_decoders)):
                assert len(modules["default"]) == (len(source[key]) if key in source else 0)
                for i, module in enumerate(modules["default"]):
                    module.weight.copy_(source[key][i])


def _snapshot(model) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(adapter tensors, everything else) of a NEAT model, cloned."""
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if "neat_" in n}
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "neat_" not in n}
    return adapter, base


def _assert_trained_like_peanut(neat_model, peanut_model, adapter_before, base_before) -> None:
    """NEAT's trained tensors equal PEANuT's; each moved far more than the tolerance; nothing else changed."""
    trainable = {n for n, p in neat_model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_before), sorted(trainable ^ set(adapter_before))[:5]
    peanut_layers = dict(peanut_model.named_modules())
    for name, layer in _neat_layers(neat_model).items():
        expected = _peanut_tensors(peanut_layers[name])
        got = _neat_tensors(layer)
        assert set(got) == set(expected)
        for key, value in got.items():
            assert value.dtype == ORACLE_DTYPE, f"{name}.{key} is {value.dtype}"
            # float64 runs: each tensor moved by > 1e-2 (checked below), seven orders of magnitude above this.
            torch.testing.assert_close(value, expected[key], rtol=1e-9, atol=1e-9, msg=f"{name}.{key}")
            moved = (value - adapter_before[f"{name}.{key}.default"]).abs().max().item()
            assert moved > 1e-2, f"{name}.{key} barely trained ({moved:.2e}): the comparison would say little"
    for name, value in neat_model.named_parameters():
        if "neat_" not in name:
            assert torch.equal(value, base_before[name]), f"base weight {name} changed"


# ---------------------------------------------------------------------------------------------- SFT

FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys, torch
    assert "neuroada_plugin" not in sys.modules
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[5])).eval()
    model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
    assert type(model.base_model).__name__ == "NeatModel", type(model.base_model)
    with torch.no_grad():
        torch.save(model(torch.tensor(json.loads(sys.argv[3]))).logits, sys.argv[4])
    """
)


def _sft_trainer(model_dir: Path, output_dir: Path, rows: list[dict], peft_config) -> SFTTrainer:
    return SFTTrainer(
        model=_load(model_dir, ORACLE_DTYPE),
        args=SFTConfig(**_common_args(output_dir), learning_rate=3e-2),
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=peft_config,
    )


@pytest.mark.parametrize(
    ("settings", "fresh_process"),
    [
        # B = 0 at the start (the model starts as the base); reloaded in this process.
        (dict(r=4, depth=0, act_fn="relu", scaling=1.0), False),
        # Residual path, every tensor trains from step 1; reloaded in a fresh process that never imports the plugin.
        (dict(r=4, depth=2, act_fn="silu", scaling=0.5, init_weights=False), True),
    ],
    ids=["depth0-relu", "depth2-silu"],
)
def test_sft_trains_exactly_like_peanut_and_reloads(tiny_llama_dir, tmp_path, settings, fresh_process):
    rows = cs.sft_rows(cs.make_splits(cs.load_source("csqa")).train[:4])
    neat = _sft_trainer(tiny_llama_dir, tmp_path / "neat", rows, NeatConfig(target_modules=TARGETS, **settings))
    peanut = _sft_trainer(tiny_llama_dir, tmp_path / "peanut", rows, PeanutConfig(target_modules=TARGETS, **settings))
    _copy_neat_into_peanut(neat.model, peanut.model)
    adapter_before, base_before = _snapshot(neat.model)
    if settings.get("init_weights", True):
        assert all((p == 0).all() for n, p in adapter_before.items() if ".neat_B." in n)

    neat.train()
    peanut.train()
    losses, expected = _losses(neat), _losses(peanut)
    assert len(losses) == len(expected) == 4
    assert losses == pytest.approx(expected, rel=1e-9, abs=0)
    assert losses[-1] < losses[0], losses  # training did something the oracle also did
    _assert_trained_like_peanut(neat.model, peanut.model, adapter_before, base_before)

    out = tmp_path / "adapter"
    neat.save_model(out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "NEAT"
    assert {key: config[key] for key in settings} == settings
    assert set(config["target_modules"]) == set(TARGETS)
    saved = load_file(out / "adapter_model.safetensors")
    # A, B (and E, D) of 14 layers and each layer's base fingerprint; no base weight.
    assert len(saved) == len(adapter_before) + 14
    assert {k.rsplit(".", 1)[-1] for k in saved} == {k.split(".")[-2] for k in adapter_before} | {"neat_fingerprint"}
    for key, value in saved.items():
        if key.endswith(".neat_fingerprint"):
            weight = base_before[key.replace(".neat_fingerprint", ".base_layer.weight")]
            assert torch.equal(value, weight_fingerprint(weight)), key

    neat.model.eval()
    with torch.no_grad():
        trained_logits = neat.model(input_ids=torch.tensor(TOKENS)).logits
        with neat.model.disable_adapter():
            assert not torch.allclose(neat.model(input_ids=torch.tensor(TOKENS)).logits, trained_logits)
    if not fresh_process:
        with torch.no_grad():
            reloaded = PeftModel.from_pretrained(_load(tiny_llama_dir, ORACLE_DTYPE), out).eval()
            assert torch.equal(reloaded(input_ids=torch.tensor(TOKENS)).logits, trained_logits)
        return
    # The start-up hook (neuroada_plugin_autoload.pth) registers NEAT when peft is imported.
    env = {k: v for k, v in os.environ.items() if k not in ("NEUROADA_PLUGIN_NO_AUTOLOAD", "PYTHONPATH")}
    args = [str(tiny_llama_dir), str(out), json.dumps(TOKENS), str(tmp_path / "logits.pt"), "float64"]
    process = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert process.returncode == 0, process.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), trained_logits)


# ---------------------------------------------------------------------------------------------- DPO


def _dpo_trainer(model_dir: Path, output_dir: Path, peft_config) -> DPOTrainer:
    questions = cs.make_splits(cs.load_source("obqa")).train[:4]
    return DPOTrainer(
        model=_load(model_dir, ORACLE_DTYPE),
        args=DPOConfig(**_common_args(output_dir), learning_rate=5e-2, beta=0.1),
        train_dataset=Dataset.from_list(cs.dpo_rows(questions)),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=peft_config,
    )


def test_dpo_first_loss_is_ln2_and_training_equals_peanut(tiny_llama_dir, tmp_path):
    config = NeatConfig()  # defaults: r=8, depth=0, relu, scaling 1, the seven projections
    neat = _dpo_trainer(tiny_llama_dir, tmp_path / "neat", config)
    oracle = PeanutConfig(
        r=config.r, depth=config.depth, act_fn=config.act_fn, scaling=config.scaling, target_modules=TARGETS
    )
    peanut = _dpo_trainer(tiny_llama_dir, tmp_path / "peanut", oracle)
    # No second model: the reference is the policy with its adapter disabled, for both methods.
    assert neat.ref_model is None and peanut.ref_model is None
    _copy_neat_into_peanut(neat.model, peanut.model)
    adapter_before, base_before = _snapshot(neat.model)
    assert all((p == 0).all() for n, p in adapter_before.items() if ".neat_B." in n)

    neat.train()
    peanut.train()
    logs = [e for e in neat.state.log_history if "loss" in e]
    expected = [e for e in peanut.state.log_history if "loss" in e]
    assert len(logs) == len(expected) == 4
    # Step 1: B = 0, so policy == reference: every log-ratio is 0 and the loss is -log(sigmoid(0)) = ln 2.
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert logs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-7)
    assert [e["loss"] for e in logs] == pytest.approx([e["loss"] for e in expected], rel=1e-9, abs=0)
    assert [e["rewards/margins"] for e in logs] == pytest.approx(
        [e["rewards/margins"] for e in expected], rel=1e-7, abs=1e-12
    )
    assert logs[-1]["loss"] < math.log(2) - 1e-2 and logs[-1]["rewards/margins"] > 0
    _assert_trained_like_peanut(neat.model, peanut.model, adapter_before, base_before)


# ---------------------------------------------------------------------------------- example scripts


def _run_example(script: str, trainer_class: str, argv: list[str], monkeypatch):
    """Run examples/trl/<script>.py as its ``__main__`` does, with ``argv``; return the trainer it built."""
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "trl"))
    sys.modules.pop(script, None)
    module = importlib.import_module(script)
    from harness.method_args import selected_method

    created = []

    class Recording(getattr(module, trainer_class)):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(module, trainer_class, Recording)
    parser = module.make_parser(selected_method(argv))
    module.main(*parser.parse_args_and_config(args=argv))
    assert len(created) == 1
    return created[0]


@pytest.mark.parametrize(
    ("script", "trainer_class", "sources", "flags"),
    [
        ("sft", "SFTTrainer", "csqa", dict(r=4, depth=1, act_fn="silu", scaling=0.5)),
        ("dpo", "DPOTrainer", "obqa", dict(r=2, depth=2, act_fn="tanh", scaling=2.0)),
    ],
    ids=["sft", "dpo"],
)
def test_example_script_with_method_neat(
    tiny_llama_dir, tmp_path, capsys, monkeypatch, script, trainer_class, sources, flags
):
    out = tmp_path / "out"
    argv = ["--method", "neat", "--model_name_or_path", str(tiny_llama_dir), "--dtype", "float32"]
    argv += ["--sources", sources, "--train_size", "4", "--eval_size", "4", "--output_dir", str(out)]
    argv += ["--max_steps", "2", "--per_device_train_batch_size", "2", "--logging_steps", "1", "--disable_tqdm", "true"]
    for key, value in flags.items():
        argv += [f"--neat_{key}", str(value)]
    trainer = _run_example(script, trainer_class, argv, monkeypatch)
    printed = capsys.readouterr().out

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "NEAT"
    assert {key: config[key] for key in flags} == flags
    assert set(config["target_modules"]) == set(TARGETS) and config["init_weights"] is True
    # Every projection of both layers: A [r, out] + B [out, r], plus depth pairs of [r, r] encoder/decoder.
    r, depth = flags["r"], flags["depth"]
    expected_trainable = 2 * sum(2 * r * out_features + 2 * depth * r * r for out_features in OUT_FEATURES.values())
    assert f"trainable parameters: {expected_trainable:,} of" in printed
    assert f"adapter saved to: {out.resolve()}" in printed

    losses = _losses(trainer)
    assert len(losses) == 2
    if script == "dpo":
        assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # B = 0: policy == reference at step 1
    model = trainer.model.eval()
    bs = [p for n, p in model.named_parameters() if ".neat_B." in n]
    assert len(bs) == 14 and all(b.abs().sum() > 0 for b in bs)  # B started at 0: it trained
    assert not any(m.merged for m in _neat_layers(model).values())  # the merged evaluation was undone

    with torch.no_grad():
        trained_logits = model(input_ids=torch.tensor(TOKENS)).logits
        reloaded = PeftModel.from_pretrained(_load(tiny_llama_dir), out).eval()
        assert torch.equal(reloaded(input_ids=torch.tensor(TOKENS)).logits, trained_logits)
    # The script's printed held-out score is the reloaded adapter's, scored independently here.
    heldout = cs.make_splits(cs.load_questions(sources)).heldout[:4]
    after = cs.evaluate_multiple_choice(reloaded, AutoTokenizer.from_pretrained(tiny_llama_dir), heldout)
    assert f"[after] held-out {after.summary()}" in printed

"""TRL trainers with SMoA (SmoaConfig) on the tiny Llama, against PEFT's HiRA and a dense float64 reference.

With one block, SMoA is PEFT's HiRA (``peft.tuners.hira``: ``dW = W0 * (B A)``) times ``alpha / r``
in the coordinates of its saved orderings; with ``alpha == r`` the factor, and so the gradient scale,
is 1. A HiraConfig run whose adapter starts from SMoA's initial values (entry ``(i, j)`` of SMoA's
``B A`` sits at ``(rows[i], cols[j])``: ``hira_A[:, cols] = A``, ``hira_B[rows] = B``; Adam is
element-wise, so the permutation changes nothing) is an independent oracle for a whole training run:
same losses at every step, same trained tensors. Both run in float64 (as tests/test_trl_neat.py's
PEANuT comparison), so that only the order of float64 roundings differs.

The example scripts run SMoA with several blocks (``--method smoa``); what they train is checked
against the dense float64 formula of tests/smoa_reference.py written into a plain model.
"""

from __future__ import annotations

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
from peft import HiraConfig, PeftModel
from safetensors.torch import load_file
from smoa_reference import dense_model, trainable_count
from test_trl_neat import OUT_FEATURES, TARGETS, TOKENS, _common_args, _losses, _run_example
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from harness import commonsense as cs
from neuroada_plugin.kit.fingerprint import weight_fingerprint
from neuroada_plugin.smoa import SmoaConfig

ORACLE_DTYPE = torch.float64
IN_FEATURES = {"down_proj": 128}  # every other projection of the tiny Llama reads the 64 hidden features


def _load(model_dir: Path, dtype: torch.dtype = ORACLE_DTYPE):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)


def _layers(model, name: str) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if hasattr(m, name) and "default" in getattr(m, name)}


def _as_hira(layer, r: int) -> dict[str, torch.Tensor]:
    """SMoA's one-block factors in HiRA's natural coordinates: ``A [r, in]``, ``B [out, r]``."""
    rows, cols = layer.smoa_rows["default"], layer.smoa_cols["default"]
    a = torch.empty(r, len(cols), dtype=layer.smoa_A["default"].dtype)
    b = torch.empty(len(rows), r, dtype=layer.smoa_B["default"].dtype)
    a[:, cols] = layer.smoa_A["default"].detach().view(r, -1)
    b[rows] = layer.smoa_B["default"].detach().view(-1, r)
    return {"A": a, "B": b}


def _copy_smoa_into_hira(smoa_model, hira_model, r: int) -> None:
    """Start HiRA from SMoA's initial values, so both runs begin identical."""
    smoa_layers, hira_layers = _layers(smoa_model, "smoa_A"), _layers(hira_model, "hira_A")
    assert set(smoa_layers) == set(hira_layers) and len(smoa_layers) == 2 * len(TARGETS)
    reordered = 0
    with torch.no_grad():
        for name, layer in hira_layers.items():
            source = _as_hira(smoa_layers[name], r)
            layer.hira_A["default"].copy_(source["A"])
            layer.hira_B["default"].copy_(source["B"])
            reordered += not torch.equal(smoa_layers[name].smoa_rows["default"], torch.arange(len(source["B"])))
    assert reordered == len(hira_layers)  # the orderings matter in every layer: the copy would catch a mix-up


def _snapshot(model) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(trainable SMoA tensors, everything else: base weights and the orderings), cloned."""
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if ".smoa_" in n}
    rest = {n: t.detach().clone() for n, t in model.state_dict().items() if ".smoa_A." not in n and ".smoa_B." not in n}
    return adapter, rest


def _assert_trained_like_hira(smoa_model, hira_model, r: int, adapter_before, rest_before) -> None:
    """SMoA's trained tensors equal HiRA's; each moved far more than the tolerance; nothing else changed."""
    trainable = {n for n, p in smoa_model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_before), sorted(trainable ^ set(adapter_before))[:5]
    hira_layers = _layers(hira_model, "hira_A")
    for name, layer in _layers(smoa_model, "smoa_A").items():
        got = _as_hira(layer, r)
        for key, value in got.items():
            assert value.dtype == ORACLE_DTYPE, f"{name}.{key} is {value.dtype}"
            expected = getattr(hira_layers[name], f"hira_{key}")["default"].detach()
            # float64 runs: each tensor moved by > 1e-2 (checked below), seven orders of magnitude above this.
            torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-9, msg=f"{name}.{key}")
            moved = (getattr(layer, f"smoa_{key}")["default"] - adapter_before[f"{name}.smoa_{key}.default"]).abs()
            assert moved.max().item() > 1e-2, f"{name}.smoa_{key} barely trained: the comparison would say little"
    for name, value in smoa_model.state_dict().items():
        if name in rest_before:  # base weights, biases, the int64 orderings and the fingerprints
            assert torch.equal(value, rest_before[name]), f"{name} changed in training"


# ---------------------------------------------------------------------------------------------- SFT

FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys, torch
    assert "neuroada_plugin" not in sys.modules
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float64).eval()
    model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
    assert type(model.base_model).__name__ == "SmoaModel", type(model.base_model)
    with torch.no_grad():
        torch.save(model(torch.tensor(json.loads(sys.argv[3]))).logits, sys.argv[4])
    """
)


def _sft_trainer(model_dir: Path, output_dir: Path, rows: list[dict], peft_config) -> SFTTrainer:
    return SFTTrainer(
        model=_load(model_dir),
        args=SFTConfig(**_common_args(output_dir), learning_rate=3e-2),
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=peft_config,
    )


def test_sft_with_one_block_trains_exactly_like_peft_hira_and_reloads_in_a_fresh_process(tiny_llama_dir, tmp_path):
    # B random too (init_weights=False): every tensor trains from step 1; alpha == r: HiRA's scale.
    settings = dict(r=4, num_blocks=1, alpha=4.0, init_weights=False)
    rows = cs.sft_rows(cs.make_splits(cs.load_source("csqa")).train[:4])
    smoa = _sft_trainer(tiny_llama_dir, tmp_path / "smoa", rows, SmoaConfig(target_modules=TARGETS, **settings))
    hira = _sft_trainer(tiny_llama_dir, tmp_path / "hira", rows, HiraConfig(r=4, target_modules=TARGETS))
    _copy_smoa_into_hira(smoa.model, hira.model, r=4)
    adapter_before, rest_before = _snapshot(smoa.model)

    smoa.train()
    hira.train()
    losses, expected = _losses(smoa), _losses(hira)
    assert len(losses) == len(expected) == 4
    assert losses == pytest.approx(expected, rel=1e-9, abs=0)
    assert losses[-1] < losses[0], losses  # training did something the oracle also did
    _assert_trained_like_hira(smoa.model, hira.model, 4, adapter_before, rest_before)

    out = tmp_path / "adapter"
    smoa.save_model(out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "SMOA"
    assert {key: config[key] for key in settings} == settings and config["branch_ranks"] is None
    assert set(config["target_modules"]) == set(TARGETS)
    saved = load_file(out / "adapter_model.safetensors")
    # Per layer: A, B, the two int64 orderings (as they were before training) and the base fingerprint.
    assert len(saved) == 14 * 5 and {k.rsplit(".", 1)[-1] for k in saved} == {
        "smoa_A", "smoa_B", "smoa_rows", "smoa_cols", "smoa_fingerprint"
    }  # fmt: skip
    for key, value in saved.items():
        name = key  # the PeftModel's own name, less the adapter name
        if key.endswith((".smoa_rows", ".smoa_cols")):
            assert value.dtype == torch.int64 and torch.equal(value, rest_before[name + ".default"]), key
        elif key.endswith(".smoa_fingerprint"):
            weight = rest_before[name.replace(".smoa_fingerprint", ".base_layer.weight")]
            assert torch.equal(value, weight_fingerprint(weight)), key
        else:
            assert torch.equal(value, dict(smoa.model.named_parameters())[name + ".default"]), key

    smoa.model.eval()
    with torch.no_grad():
        trained_logits = smoa.model(input_ids=torch.tensor(TOKENS)).logits
        with smoa.model.disable_adapter():
            assert not torch.allclose(smoa.model(input_ids=torch.tensor(TOKENS)).logits, trained_logits)
    # The start-up hook (neuroada_plugin_autoload.pth) registers SMoA when peft is imported.
    env = {k: v for k, v in os.environ.items() if k not in ("NEUROADA_PLUGIN_NO_AUTOLOAD", "PYTHONPATH")}
    args = [str(tiny_llama_dir), str(out), json.dumps(TOKENS), str(tmp_path / "logits.pt")]
    process = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert process.returncode == 0, process.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), trained_logits)


# ---------------------------------------------------------------------------------------------- DPO


def _dpo_trainer(model_dir: Path, output_dir: Path, peft_config) -> DPOTrainer:
    questions = cs.make_splits(cs.load_source("obqa")).train[:4]
    return DPOTrainer(
        model=_load(model_dir),
        args=DPOConfig(**_common_args(output_dir), learning_rate=5e-2, beta=0.1),
        train_dataset=Dataset.from_list(cs.dpo_rows(questions)),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=peft_config,
    )


def test_dpo_with_one_block_first_loss_is_ln2_and_training_equals_peft_hira(tiny_llama_dir, tmp_path):
    config = SmoaConfig(num_blocks=1)  # otherwise the defaults: r=8, alpha=8 (scale 1), B = 0, the seven projections
    assert (config.r, config.alpha, config.init_weights) == (8, 8.0, True)
    smoa = _dpo_trainer(tiny_llama_dir, tmp_path / "smoa", config)
    hira = _dpo_trainer(tiny_llama_dir, tmp_path / "hira", HiraConfig(r=config.r, target_modules=TARGETS))
    # No second model: the reference is the policy with its adapter disabled, for both methods.
    assert smoa.ref_model is None and hira.ref_model is None
    _copy_smoa_into_hira(smoa.model, hira.model, r=config.r)
    adapter_before, rest_before = _snapshot(smoa.model)
    assert all((p == 0).all() for n, p in adapter_before.items() if ".smoa_B." in n)

    smoa.train()
    hira.train()
    logs = [e for e in smoa.state.log_history if "loss" in e]
    expected = [e for e in hira.state.log_history if "loss" in e]
    assert len(logs) == len(expected) == 4
    # Step 1: B = 0, so policy == reference: every log-ratio is 0 and the loss is -log(sigmoid(0)) = ln 2.
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert logs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-7)
    assert [e["loss"] for e in logs] == pytest.approx([e["loss"] for e in expected], rel=1e-9, abs=0)
    assert [e["rewards/margins"] for e in logs] == pytest.approx(
        [e["rewards/margins"] for e in expected], rel=1e-7, abs=1e-12
    )
    assert logs[-1]["loss"] < math.log(2) - 1e-2 and logs[-1]["rewards/margins"] > 0
    _assert_trained_like_hira(smoa.model, hira.model, config.r, adapter_before, rest_before)


# ---------------------------------------------------------------------------------- example scripts


@pytest.mark.parametrize(
    ("script", "trainer_class", "sources", "flags"),
    [
        ("sft", "SFTTrainer", "csqa", dict(r=4, num_blocks=2, alpha=8.0)),
        ("dpo", "DPOTrainer", "obqa", dict(r=5, num_blocks=3, alpha=10.0, branch_ranks=[3, 0, 2])),
    ],
    ids=["sft", "dpo"],
)
def test_example_script_with_method_smoa(
    tiny_llama_dir, tmp_path, capsys, monkeypatch, script, trainer_class, sources, flags
):
    out = tmp_path / "out"
    argv = ["--method", "smoa", "--model_name_or_path", str(tiny_llama_dir), "--dtype", "float32"]
    argv += ["--sources", sources, "--train_size", "4", "--eval_size", "4", "--output_dir", str(out)]
    argv += ["--max_steps", "2", "--per_device_train_batch_size", "2", "--logging_steps", "1", "--disable_tqdm", "true"]
    for key, value in flags.items():
        argv += [f"--smoa_{key}", *map(str, value if isinstance(value, list) else [value])]
    trainer = _run_example(script, trainer_class, argv, monkeypatch)
    printed = capsys.readouterr().out

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "SMOA"
    assert {key: config[key] for key in flags} == flags
    assert set(config["target_modules"]) == set(TARGETS) and config["init_weights"] is True
    assert config["dropout"] == 0.0 and config.get("branch_ranks") == flags.get("branch_ranks")
    # Every projection of both layers: sum over blocks of r_k (|R_k| + |C_k|).
    expected_trainable = 2 * sum(
        trainable_count(out, IN_FEATURES.get(name, 64), config) for name, out in OUT_FEATURES.items()
    )
    assert sum(p.numel() for p in trainer.model.parameters() if p.requires_grad) == expected_trainable
    assert f"trainable parameters: {expected_trainable:,} of" in printed
    assert f"adapter saved to: {out.resolve()}" in printed

    losses = _losses(trainer)
    assert len(losses) == 2
    if script == "dpo":
        assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # B = 0: policy == reference at step 1
    model = trainer.model.eval()
    bs = [p for n, p in model.named_parameters() if ".smoa_B." in n]
    assert len(bs) == 14 and all(b.abs().sum() > 0 for b in bs)  # B started at 0: it trained
    assert not any(m.merged for m in _layers(model, "smoa_A").values())  # the merged evaluation was undone

    with torch.no_grad():
        trained_logits = model(input_ids=torch.tensor(TOKENS)).logits
        reloaded = PeftModel.from_pretrained(_load(tiny_llama_dir, torch.float32), out).eval()
        assert torch.equal(reloaded(input_ids=torch.tensor(TOKENS)).logits, trained_logits)
        # Several blocks: the saved adapter computes the dense float64 formula (both sides in float64).
        got = PeftModel.from_pretrained(_load(tiny_llama_dir), out).eval()(input_ids=torch.tensor(TOKENS)).logits
        want = dense_model(tiny_llama_dir, out)(input_ids=torch.tensor(TOKENS)).logits
        base = _load(tiny_llama_dir).eval()(input_ids=torch.tensor(TOKENS)).logits
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert (want - base).abs().max() > 1e-4, "the trained update does not change the logits: the check says little"
    # The script's printed held-out score is the reloaded adapter's, scored independently here.
    heldout = cs.make_splits(cs.load_questions(sources)).heldout[:4]
    after = cs.evaluate_multiple_choice(reloaded, AutoTokenizer.from_pretrained(tiny_llama_dir), heldout)
    assert f"[after] held-out {after.summary()}" in printed

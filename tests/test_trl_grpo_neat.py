"""TRL GRPOTrainer with NeatConfig and beta > 0, against PEFT's PEANuT trained from the same initial values.

As in tests/test_trl_grpo.py the KL reference is the adapter-disabled policy (no second model). As in
tests/test_trl_neat.py the oracle is a PeanutConfig run started from NEAT's initial tensors: with the
same seed before training, both runs sample the same completions (their logits agree to float64
rounding), get the same rewards, and must log the same loss and KL at every step and end with the same
trained tensors.
"""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from peft import PeanutConfig, PeftModel
from safetensors.torch import load_file
from test_trl_grpo import _config, _distinct_characters
from test_trl_neat import (
    ORACLE_DTYPE,
    OUT_FEATURES,
    TARGETS,
    TOKENS,
    _assert_trained_like_peanut,
    _copy_neat_into_peanut,
    _run_example,
    _snapshot,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from trl import GRPOConfig, GRPOTrainer

from harness import commonsense as cs
from neuroada_plugin import NeatConfig

SETTINGS = dict(r=4, depth=1, act_fn="relu", scaling=1.0)  # B = 0 at the start: the policy starts as the reference


def _trainer(model_dir, args: GRPOConfig, peft_config) -> GRPOTrainer:
    questions = cs.make_splits(cs.load_source("obqa")).train[:4]
    return GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=ORACLE_DTYPE),
        reward_funcs=[cs.option_reward, _distinct_characters],
        args=args,
        train_dataset=Dataset.from_list(cs.grpo_rows(questions)),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=peft_config,
    )


def _logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "kl" in entry]


def test_grpo_neat_with_kl_to_the_disabled_adapter_equals_peanut(tiny_llama_dir, tmp_path):
    neat = _trainer(tiny_llama_dir, _config(tmp_path / "neat"), NeatConfig(target_modules=TARGETS, **SETTINGS))
    peanut = _trainer(tiny_llama_dir, _config(tmp_path / "peanut"), PeanutConfig(target_modules=TARGETS, **SETTINGS))
    assert neat.ref_model is None and peanut.ref_model is None  # the reference is the adapter-disabled policy
    _copy_neat_into_peanut(neat.model, peanut.model)
    adapter_before, base_before = _snapshot(neat.model)
    assert all((p == 0).all() for n, p in adapter_before.items() if ".neat_B." in n)
    assert {n.split(".")[-2] for n in adapter_before} == {"neat_A", "neat_B", "neat_E", "neat_D"}

    set_seed(0)  # the same sampling stream for both runs
    neat.train()
    set_seed(0)
    peanut.train()

    logs, expected = _logs(neat), _logs(peanut)
    assert len(logs) == len(expected) == 3
    # Step 1: B = 0, so the policy is the reference bit for bit and the KL estimate is exactly 0.
    assert logs[0]["kl"] == 0.0 and expected[0]["kl"] == 0.0
    assert logs[-1]["kl"] > 0.0
    assert all(0.0 <= entry["rewards/option_reward/mean"] <= 1.0 for entry in logs)
    # Same completions sampled at every step (same rewards), same objective.
    for key in ("reward", "rewards/option_reward/mean", "rewards/_distinct_characters/mean"):
        assert [e[key] for e in logs] == [e[key] for e in expected], key
    assert [e["loss"] for e in logs] == pytest.approx([e["loss"] for e in expected], rel=1e-9, abs=1e-12)
    assert [e["kl"] for e in logs] == pytest.approx([e["kl"] for e in expected], rel=1e-9, abs=1e-12)
    # A, B, E, D of all 14 layers equal PEANuT's and moved; no base weight changed.
    _assert_trained_like_peanut(neat.model, peanut.model, adapter_before, base_before)

    # The reference TRL used (adapter disabled) is exactly the untouched base model.
    ids = torch.tensor(TOKENS)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=ORACLE_DTYPE).eval()
    model = neat.model.eval()
    with torch.no_grad():
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)
        trained_logits = model(input_ids=ids).logits
        assert not torch.allclose(trained_logits, fresh(input_ids=ids).logits)

    # Saved adapter: NEAT's config and tensors only; it reloads with the trained logits.
    out = tmp_path / "adapter"
    neat.save_model(out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "NEAT"
    assert {key: config[key] for key in SETTINGS} == SETTINGS
    assert len(load_file(out / "adapter_model.safetensors")) == len(adapter_before) + 14  # + base fingerprints
    with torch.no_grad():
        reloaded = PeftModel.from_pretrained(fresh, out).eval()
        assert type(reloaded.base_model).__name__ == "NeatModel"
        assert torch.equal(reloaded(input_ids=ids).logits, trained_logits)


def test_grpo_example_script_with_method_neat(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    """examples/trl/grpo.py --method neat: the flags land in the saved config and the adapter reloads with the
    trained logits. B is drawn at random (--neat_init_weights false) so the policy differs from the reference
    from step 1 and the reload check compares something other than the base model."""
    out = tmp_path / "out"
    flags = dict(r=2, depth=1, act_fn="tanh", scaling=0.5)
    argv = ["--method", "neat", "--model_name_or_path", str(tiny_llama_dir), "--dtype", "float32"]
    argv += ["--sources", "obqa", "--train_size", "4", "--eval_size", "4", "--output_dir", str(out)]
    argv += ["--max_steps", "1", "--per_device_train_batch_size", "8", "--max_completion_length", "4"]
    argv += ["--logging_steps", "1", "--disable_tqdm", "true", "--neat_init_weights", "false"]
    for key, value in flags.items():
        argv += [f"--neat_{key}", str(value)]
    trainer = _run_example("grpo", "GRPOTrainer", argv, monkeypatch)
    printed = capsys.readouterr().out
    assert "==== GRPO + NEAT summary ====" in printed, printed[-2000:]
    assert f"adapter saved to: {out.resolve()}" in printed
    # Every projection of both layers: A [r, out] + B [out, r], plus depth pairs of [r, r] encoder/decoder.
    r, depth = flags["r"], flags["depth"]
    expected_trainable = 2 * sum(2 * r * out_features + 2 * depth * r * r for out_features in OUT_FEATURES.values())
    assert f"trainable parameters: {expected_trainable:,} of" in printed

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "NEAT" and config["init_weights"] is False
    assert {key: config[key] for key in flags} == flags
    [log] = _logs(trainer)
    assert log["kl"] > 0.0  # random B: the policy is not the adapter-disabled reference

    model = trainer.model.eval()
    ids = torch.tensor(TOKENS)
    with torch.no_grad():
        trained_logits = model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
        assert not torch.allclose(base(input_ids=ids).logits, trained_logits)
        reloaded = PeftModel.from_pretrained(base, out).eval()
        assert torch.equal(reloaded(input_ids=ids).logits, trained_logits)

"""NEAT: train -> save -> ``neuroada-plugin merge`` (streaming) -> vLLM, token for token against the unmerged adapter.

The setting of ``tests/test_serving_vllm.py`` (its tiny Llama, texts, training loop and vLLM
runner are reused) with a NEAT adapter (``r=8``, one residual encoder/decoder pair, SiLU,
scaling 0.5) trained until its greedy continuations have clear logit margins. Checked here:

* the streaming merge writes every tensor bit for bit as PEFT's in-memory ``merge_and_unload()``
  of the saved adapter (float32, and a sharded bf16 copy of the base);
* the merged weights equal PEFT's own implementation of the method (``PeanutConfig``, the saved
  values copied in) merged with ``merge_and_unload()``, to float tolerance;
* vLLM's offline engine on the merged checkpoint generates exactly the greedy tokens of
  transformers + the unmerged adapter, and not those of the base model;
* the adapter exported as a standard LoRA adapter (``neuroada-plugin neat-to-lora``) and served
  on the unmodified base through vLLM's multi-LoRA path generates those same tokens.

vLLM runs from ``.venv-vllm``; without it the vLLM test FAILS (not skips), as in test_serving_vllm.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import test_serving_vllm as serving_test
import torch
from peft import PeanutConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from test_serving_vllm import MAX_TOKENS, TINY, _greedy, train_until_stable, training_data, vllm_offline_generate
from transformers import AutoModelForCausalLM, AutoTokenizer

from neuroada_plugin.neat import NeatConfig

from tiny_models import save_tiny_llama

vllm_python = serving_test.vllm_python  # the fixture: .venv-vllm's python, or a failure saying how to make it

NEAT = dict(r=8, depth=1, act_fn="silu", scaling=0.5)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def merge(base: Path, adapter: Path, output: Path) -> subprocess.CompletedProcess:
    """``neuroada-plugin merge`` as a user runs it (``python -m neuroada_plugin`` = the console script)."""
    command = [sys.executable, "-m", "neuroada_plugin", "merge", "--base", str(base), "--adapter", str(adapter)]
    process = subprocess.run(
        [*command, "--output", str(output), "--no-progress"], capture_output=True, text=True, timeout=300
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    return process


def read_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    return state


@pytest.fixture(scope="module")
def neat_loop(tmp_path_factory) -> dict:
    """Train a NEAT adapter, save it, merge it with the CLI; greedy outputs of the reloaded adapter and of the base."""
    root = tmp_path_factory.mktemp("neat-loop")
    base = save_tiny_llama(root / "base", seed=0, **TINY)
    tokenizer = AutoTokenizer.from_pretrained(base)
    eos = tokenizer.eos_token_id
    data = training_data(tokenizer)

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), NeatConfig(**NEAT))
    references = train_until_stable(model, data, eos, lr=3e-2)
    adapter = root / "adapter"
    model.save_pretrained(adapter)
    merged = root / "merged"
    merge(base, adapter, merged)

    # The reference is the *saved* adapter, loaded fresh on the float32 base (transformers, unmerged).
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    expected = [_greedy(reloaded.eval(), p, MAX_TOKENS, eos)[0] for p in data["prompts"]]
    assert expected == [tokens for tokens, _ in references]
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    return {
        "base": base,
        "adapter": adapter,
        "merged": merged,
        "eos": eos,
        "prompts": data["prompts"],
        "expected": expected,
        "base_outputs": [_greedy(base_model, p, MAX_TOKENS, eos)[0] for p in data["prompts"]],
    }


def test_neat_adapter_and_merge_info(neat_loop):
    config = json.loads((neat_loop["adapter"] / "adapter_config.json").read_text())
    assert config["peft_type"] == "NEAT" and {k: config[k] for k in NEAT} == NEAT, config
    info = json.loads((neat_loop["merged"] / "merge_info.json").read_text())
    assert (info["method"], info["peft_type"], info["patched"], info["exact_merge"]) == ("neat", "NEAT", 14, True), info
    # A plain checkpoint: no adapter tensor names, config and tokenizer alongside.
    assert all("neat" not in key and "base_layer" not in key for key in read_checkpoint(neat_loop["merged"]))
    assert (neat_loop["merged"] / "config.json").is_file() and (neat_loop["merged"] / "tokenizer.json").is_file()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_neat_streaming_merge_equals_in_memory_merge_bit_for_bit(neat_loop, tmp_path, dtype):
    if dtype == torch.float32:
        base, out = neat_loop["base"], neat_loop["merged"]  # the checkpoint vLLM serves
    else:  # a sharded bf16 copy of the base, merged again
        base, out = tmp_path / "base-bf16", tmp_path / "merged-bf16"
        AutoModelForCausalLM.from_pretrained(neat_loop["base"], dtype=dtype).save_pretrained(base, max_shard_size="5MB")
        assert len(list(base.glob("*.safetensors"))) > 1
        merge(base, neat_loop["adapter"], out)
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=dtype), neat_loop["adapter"]
    ).merge_and_unload()
    want, got, base_state = reference.state_dict(), read_checkpoint(out), read_checkpoint(base)
    assert sorted(got) == sorted(want)
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32  # compare bit patterns (also -0.0, NaN)
    changed = set()
    for name, tensor in got.items():
        assert tensor.dtype == dtype, name
        assert torch.equal(tensor.view(bits), want[name].view(bits)), name
        if not torch.equal(tensor, base_state[name]):
            changed.add(name)
    # Exactly the 7 projections of both layers changed.
    assert len(changed) == 14 and {name.rsplit(".", 2)[-2] for name in changed} == set(PROJECTIONS), sorted(changed)


def test_neat_merge_equals_peanut_merge_and_unload(neat_loop):
    """PEFT's PEANuT (the same method, PEFT's code) with the saved NEAT values copied in, merged in memory."""
    saved = load_file(neat_loop["adapter"] / "adapter_model.safetensors")
    peanut = get_peft_model(
        AutoModelForCausalLM.from_pretrained(neat_loop["base"], dtype=torch.float32),
        PeanutConfig(**NEAT, target_modules=list(PROJECTIONS)),
    )
    copied = 0
    with torch.no_grad():
        for name, layer in peanut.base_model.model.named_modules():
            if not hasattr(layer, "peanut_A"):
                continue
            prefix = f"base_model.model.{name}.neat_"
            layer.peanut_A["default"].weight.copy_(saved[prefix + "A"])
            layer.peanut_B["default"].weight.copy_(saved[prefix + "B"])
            for level in range(NEAT["depth"]):
                layer.peanut_encoders["default"][level].weight.copy_(saved[prefix + "E"][level])
                layer.peanut_decoders["default"][level].weight.copy_(saved[prefix + "D"][level])
            copied += 1
    assert copied == 14 and len(saved) == 14 * 5, (copied, sorted(saved))  # A, B, E, D, base fingerprint
    want = peanut.merge_and_unload().state_dict()
    got = read_checkpoint(neat_loop["merged"])
    base_state = read_checkpoint(neat_loop["base"])
    assert sorted(got) == sorted(want)
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, want[name], rtol=1e-5, atol=1e-6, msg=name)
        if "_proj" in name:  # the update is not negligible next to that tolerance
            assert (tensor - base_state[name]).abs().max() > 1e-3, name


def test_neat_merged_checkpoint_in_transformers_matches_unmerged_adapter(neat_loop):
    merged = AutoModelForCausalLM.from_pretrained(neat_loop["merged"], dtype=torch.float32).eval()
    got = [_greedy(merged, p, MAX_TOKENS, neat_loop["eos"])[0] for p in neat_loop["prompts"]]
    assert got == neat_loop["expected"]


def test_vllm_offline_engine_serves_merged_neat_like_unmerged_adapter(vllm_python, neat_loop, tmp_path):
    outputs = vllm_offline_generate(vllm_python, neat_loop["merged"], neat_loop["prompts"], tmp_path)
    assert outputs == neat_loop["expected"]
    # Not vacuous: the base model continues every prompt differently.
    for prompt, got, base in zip(neat_loop["prompts"], outputs, neat_loop["base_outputs"], strict=True):
        assert got != base, (prompt, got, base)


def test_vllm_multi_lora_serves_the_exported_neat_adapter_like_the_adapter(vllm_python, neat_loop, tmp_path):
    lora = tmp_path / "neat-as-lora"
    command = [sys.executable, "-m", "neuroada_plugin", "neat-to-lora", "--base", str(neat_loop["base"])]
    process = subprocess.run(
        [*command, "--adapter", str(neat_loop["adapter"]), "--output", str(lora), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    config = json.loads((lora / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", NEAT["r"], NEAT["r"])
    outputs = vllm_offline_generate(vllm_python, neat_loop["base"], neat_loop["prompts"], tmp_path, lora=lora)
    assert outputs == neat_loop["expected"]

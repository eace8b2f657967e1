"""SMoA: train -> save -> ``neuroada-plugin merge`` (streaming) -> vLLM, token for token against the unmerged adapter.

The setting of ``tests/test_serving_vllm.py`` (its tiny Llama, texts, training loop and vLLM runner are
reused; the CLI merge helper is tests/test_serving_vllm_neat.py's) with an SMoA adapter (``r=8``, three
blocks, ``alpha=32``) trained until its greedy continuations have clear logit margins. Checked here:

* the streaming merge writes every tensor bit for bit as PEFT's in-memory ``merge_and_unload()`` of the
  saved adapter;
* the merged weights equal ``W0 + dW`` with ``dW`` from the formula and the saved tensors alone, in
  float64 (tests/smoa_reference.py), to float32 rounding;
* transformers on the merged checkpoint, and vLLM's offline engine on it, generate exactly the greedy
  tokens of transformers + the unmerged adapter, and not those of the base model.

vLLM runs from ``.venv-vllm``; without it the vLLM test FAILS (not skips), as in test_serving_vllm.py.
"""

from __future__ import annotations

import json

import pytest
import test_serving_vllm as serving_test
import torch
from peft import PeftModel, get_peft_model
from smoa_reference import adapter_tensors, dense_delta
from test_serving_vllm import MAX_TOKENS, TINY, _greedy, train_until_stable, training_data, vllm_offline_generate
from test_serving_vllm_neat import merge, read_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

from neuroada_plugin.smoa import SmoaConfig

from tiny_models import save_tiny_llama

vllm_python = serving_test.vllm_python  # the fixture: .venv-vllm's python, or a failure saying how to make it

SMOA = dict(r=8, num_blocks=3, alpha=32.0)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def smoa_loop(tmp_path_factory) -> dict:
    """Train an SMoA adapter, save it, merge it with the CLI; greedy outputs of the reloaded adapter and of the base."""
    root = tmp_path_factory.mktemp("smoa-loop")
    base = save_tiny_llama(root / "base", seed=0, **TINY)
    tokenizer = AutoTokenizer.from_pretrained(base)
    eos = tokenizer.eos_token_id
    data = training_data(tokenizer)

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), SmoaConfig(**SMOA))
    references = train_until_stable(model, data, eos, lr=5e-2)  # stable margins after the first 30 steps
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


def test_smoa_streaming_merge_equals_in_memory_merge_and_the_dense_formula(smoa_loop):
    config = json.loads((smoa_loop["adapter"] / "adapter_config.json").read_text())
    assert config["peft_type"] == "SMOA" and {k: config[k] for k in SMOA} == SMOA, config
    info = json.loads((smoa_loop["merged"] / "merge_info.json").read_text())
    assert (info["method"], info["peft_type"], info["patched"], info["exact_merge"]) == ("smoa", "SMOA", 14, True), info
    assert (smoa_loop["merged"] / "config.json").is_file() and (smoa_loop["merged"] / "tokenizer.json").is_file()

    got, base_state = read_checkpoint(smoa_loop["merged"]), read_checkpoint(smoa_loop["base"])
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(smoa_loop["base"], dtype=torch.float32), smoa_loop["adapter"]
    ).merge_and_unload()
    want = reference.state_dict()
    assert sorted(got) == sorted(want) and sorted(got) == sorted(base_state)  # a plain checkpoint
    adapter = adapter_tensors(smoa_loop["adapter"])
    assert len(adapter) == 14 and {key.rsplit(".", 2)[-2] for key in adapter} == set(PROJECTIONS)
    for name, tensor in got.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor.view(torch.int32), want[name].view(torch.int32)), name  # bit for bit
        if name in adapter:
            dense = base_state[name].double() + dense_delta(base_state[name], adapter[name], config)
            torch.testing.assert_close(tensor.double(), dense, rtol=0, atol=1e-6, msg=name)
            assert (tensor - base_state[name]).abs().max() > 1e-3, name  # the update is far above that tolerance
        else:
            assert torch.equal(tensor, base_state[name]), name


def test_smoa_merged_checkpoint_in_transformers_matches_unmerged_adapter(smoa_loop):
    merged = AutoModelForCausalLM.from_pretrained(smoa_loop["merged"], dtype=torch.float32).eval()
    got = [_greedy(merged, p, MAX_TOKENS, smoa_loop["eos"])[0] for p in smoa_loop["prompts"]]
    assert got == smoa_loop["expected"]


def test_vllm_offline_engine_serves_merged_smoa_like_unmerged_adapter(vllm_python, smoa_loop, tmp_path):
    outputs = vllm_offline_generate(vllm_python, smoa_loop["merged"], smoa_loop["prompts"], tmp_path)
    assert outputs == smoa_loop["expected"]
    # Not vacuous: the base model continues every prompt differently.
    for prompt, got, base in zip(smoa_loop["prompts"], outputs, smoa_loop["base_outputs"], strict=True):
        assert got != base, (prompt, got, base)

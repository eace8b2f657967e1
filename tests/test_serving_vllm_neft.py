"""NeFT: train -> save -> ``neuroada-plugin merge`` (streaming) -> vLLM, token for token against the unmerged adapter.

The setting of ``tests/test_serving_vllm.py`` (its tiny Llama, texts, training loop and vLLM runner are
reused; the CLI merge helper is tests/test_serving_vllm_neat.py's) with a NeFT adapter on the data-free
``selection="magnitude"`` rule (``neuron_share=0.002``: about 200 of the 512 up_proj rows and down_proj
columns) trained until its greedy continuations have clear logit margins. Checked here:

* the trained neurons are the largest-norm ones over all four layers, recomputed from the base weights;
* the streaming merge writes every tensor bit for bit as PEFT's in-memory ``merge_and_unload()`` of the
  saved adapter, and every adapted weight bit for bit as ``W0 + dW`` (``dW`` from the saved tensors alone,
  tests/neft_reference.py) rounded once to float32; nothing else changes;
* transformers on the merged checkpoint, and vLLM's offline engine on it, generate exactly the greedy
  tokens of transformers + the unmerged adapter, and not those of the base model.

vLLM runs from ``.venv-vllm``; without it the vLLM test FAILS (not skips), as in test_serving_vllm.py.
"""

from __future__ import annotations

import json

import pytest
import test_serving_vllm as serving_test
import torch
from neft_reference import adapter_config, adapter_tensors, magnitude_selection, merged_float, neuron_mask, neurons
from peft import PeftModel, get_peft_model
from test_serving_vllm import MAX_TOKENS, TINY, _greedy, train_until_stable, training_data, vllm_offline_generate
from test_serving_vllm_neat import merge, read_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

from neuroada_plugin.neft import NeftConfig

from tiny_models import save_tiny_llama

vllm_python = serving_test.vllm_python  # the fixture: .venv-vllm's python, or a failure saying how to make it

NEFT = dict(selection="magnitude", neuron_share=0.002)


@pytest.fixture(scope="module")
def neft_loop(tmp_path_factory) -> dict:
    """Train a NeFT adapter, save it, merge it with the CLI; greedy outputs of the reloaded adapter and of the base."""
    root = tmp_path_factory.mktemp("neft-loop")
    base = save_tiny_llama(root / "base", seed=0, **TINY)
    tokenizer = AutoTokenizer.from_pretrained(base)
    eos = tokenizer.eos_token_id
    data = training_data(tokenizer)

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), NeftConfig(**NEFT))
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


def test_neft_streaming_merge_equals_in_memory_merge_and_the_exact_sum(neft_loop):
    config = adapter_config(neft_loop["adapter"])
    assert config["peft_type"] == "NEFT" and {k: config[k] for k in NEFT} == NEFT, config
    base_state = read_checkpoint(neft_loop["base"])
    adapter = adapter_tensors(neft_loop["adapter"])
    expected = magnitude_selection(base_state, neuron_share=NEFT["neuron_share"])
    selected = {key.removesuffix(".weight"): neurons(t) for key, t in adapter.items()}
    assert {module: (axis, index.tolist()) for module, (axis, index) in selected.items()} == expected
    assert {neurons(t)[0] for t in adapter.values()} == {"rows", "cols"} and len(adapter) == 4

    info = json.loads((neft_loop["merged"] / "merge_info.json").read_text())
    assert (info["method"], info["peft_type"], info["patched"], info["exact_merge"]) == ("neft", "NEFT", 4, True), info
    assert (neft_loop["merged"] / "config.json").is_file() and (neft_loop["merged"] / "tokenizer.json").is_file()

    got = read_checkpoint(neft_loop["merged"])
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(neft_loop["base"], dtype=torch.float32), neft_loop["adapter"]
    ).merge_and_unload()
    want = reference.state_dict()
    assert sorted(got) == sorted(want) and sorted(got) == sorted(base_state)  # a plain checkpoint
    for name, tensor in got.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor.view(torch.int32), want[name].view(torch.int32)), name  # bit for bit
        if name in adapter:
            assert torch.equal(tensor, merged_float(base_state[name], adapter[name])), name
            moved = tensor != base_state[name]
            assert torch.equal(moved, neuron_mask(tuple(tensor.shape), *neurons(adapter[name]))), name
        else:
            assert torch.equal(tensor, base_state[name]), name


def test_neft_merged_checkpoint_in_transformers_matches_unmerged_adapter(neft_loop):
    merged = AutoModelForCausalLM.from_pretrained(neft_loop["merged"], dtype=torch.float32).eval()
    got = [_greedy(merged, p, MAX_TOKENS, neft_loop["eos"])[0] for p in neft_loop["prompts"]]
    assert got == neft_loop["expected"]


def test_vllm_offline_engine_serves_merged_neft_like_unmerged_adapter(vllm_python, neft_loop, tmp_path):
    outputs = vllm_offline_generate(vllm_python, neft_loop["merged"], neft_loop["prompts"], tmp_path)
    assert outputs == neft_loop["expected"]
    # Not vacuous: the base model continues every prompt differently.
    for prompt, got, base in zip(neft_loop["prompts"], outputs, neft_loop["base_outputs"], strict=True):
        assert got != base, (prompt, got, base)

"""DeepSpeed ZeRO-3 on 2 CPU processes (gloo, ``DS_ACCELERATOR=cpu``), against one process.

The worker (tests/distributed/zero3_worker.py) loads the tiny Llama with ``from_pretrained`` under
ZeRO-3 (weights partitioned: 0 local elements, also theta once the engine is built), creates the
adapter, trains 3 DeepSpeed engine steps, saves, and merges/unmerges per layer and the way TRL's
GRPO vLLM sync does. Everything it wrote is compared here with independent references: per-row
top-|W| of the full weights, a single-process AdamW run on the same global batch, and the saved
adapter reloaded in this process.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.distributed.common import (
    TOP_K,
    assert_theta_close,
    launch,
    make_data,
    peft_config,
    reference_train,
    save_base,
    top_abs_indices,
)


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    base = save_base(out / "base")
    data = make_data(out / "data.pt")
    result = launch("zero3_worker.py", out, "--base", str(base), "--data", str(out / "data.pt"))
    theta_ref, indices_ref = reference_train(base, data)
    return {"out": out, "base": base, "data": data, "result": result, "theta": theta_ref, "indices": indices_ref}


def _base_weights(base_dir) -> dict[str, torch.Tensor]:
    return load_file(base_dir / "model.safetensors")


def test_weights_were_partitioned_when_the_adapter_was_created(zero3):
    for rank in ("rank0", "rank1"):
        info = zero3["result"][rank]
        assert info["partitioned"] and info["local_numel"] == 0
        assert info["theta_partitioned"]
        assert info["theta_status_after_steps"] == ["ZeroParamStatus.NOT_AVAILABLE"]
        assert info["agreement_buffers"] == 12  # 6 projections x 2 layers, checked across ranks


def test_indices_agree_across_ranks_and_are_top_abs_of_the_full_weight(zero3):
    rank0 = torch.load(zero3["out"] / "indices_rank0.pt")
    rank1 = torch.load(zero3["out"] / "indices_rank1.pt")
    weights = _base_weights(zero3["base"])
    assert len(rank0) == 12 and rank0.keys() == rank1.keys()
    for key, indices in rank0.items():
        assert torch.equal(indices, rank1[key]), key
        weight = weights[key.split(".neuroada_indices.")[0] + ".weight"]
        assert indices.shape == (weight.shape[0], TOP_K)
        assert torch.equal(indices, top_abs_indices(weight, TOP_K)), key
        assert torch.equal(indices, zero3["indices"][key])  # and what one process selects


def test_saved_adapter_is_complete_and_equals_the_single_process_run(zero3):
    saved = load_file(zero3["out"] / "adapter" / "adapter_model.safetensors")
    thetas = {k: v for k, v in saved.items() if ".neuroada_theta" in k}
    assert len(thetas) == 12 and len([k for k in saved if ".neuroada_indices" in k]) == 12
    actual = {}
    for key in zero3["theta"]:
        layer = key.split(".neuroada_theta.")[0]
        actual[key] = saved[f"base_model.model.{layer}.neuroada_theta"]
        indices = saved[f"base_model.model.{layer}.neuroada_indices"]
        assert torch.equal(indices, zero3["indices"][key.replace("theta", "indices")])
    assert_theta_close(actual, zero3["theta"])


def test_plain_save_of_the_partitioned_model_is_refused(zero3):
    for rank in ("rank0", "rank1"):
        assert zero3["result"][rank]["naive_save"].startswith("refused: NeuroAda adapter state holds 12 partitioned")


def test_loading_into_the_engines_partitioned_theta_is_refused(zero3):
    for rank in ("rank0", "rank1"):
        message = zero3["result"][rank]["load_into_engine"]
        assert message.startswith("refused: NeuroAda layer model.layers.0.")
        assert "Load the adapter before deepspeed.initialize" in message


def test_disabled_adapter_gives_the_base_logits_under_zero3(zero3):
    """DPO's reference forward (policy with the adapter disabled) on the sharded, trained model."""
    base = AutoModelForCausalLM.from_pretrained(zero3["base"]).eval()
    with torch.no_grad():
        expected = base(input_ids=zero3["data"][0]).logits
    for rank in (0, 1):
        disabled = torch.load(zero3["out"] / f"disabled_logits_rank{rank}.pt")
        torch.testing.assert_close(disabled, expected, rtol=1e-5, atol=1e-5)
        trained = torch.load(zero3["out"] / f"logits_rank{rank}.pt")
        assert (trained - expected).abs().max() > 1e-3  # the adapter does change the output


def test_reloaded_adapter_gives_the_zero3_logits(zero3):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zero3["base"]), zero3["out"] / "adapter")
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=zero3["data"][0]).logits
    for rank in (0, 1):
        torch.testing.assert_close(torch.load(zero3["out"] / f"logits_rank{rank}.pt"), logits, rtol=1e-5, atol=1e-5)
        merged = torch.load(zero3["out"] / f"merged_logits_rank{rank}.pt")
        torch.testing.assert_close(merged, logits, rtol=1e-4, atol=1e-4)


def _plain(key: str) -> str:
    return key.removeprefix("base_model.model.").replace(".base_layer.", ".")


def test_merge_under_zero3_is_exact_and_unmerge_restores(zero3):
    states = torch.load(zero3["out"] / "merge.pt")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zero3["base"]), zero3["out"] / "adapter")
    expected = model.merge_and_unload().state_dict()
    before = {_plain(k): v for k, v in states["before"].items() if "neuroada_" not in k}
    changed = 0
    for merged_key, restored_key in (("merged", "restored"), ("trl_merged", "trl_restored")):
        merged = {_plain(k): v for k, v in states[merged_key].items() if "neuroada_" not in k}
        restored = {_plain(k): v for k, v in states[restored_key].items() if "neuroada_" not in k}
        assert merged.keys() == before.keys() == restored.keys()
        for key, value in merged.items():
            assert torch.equal(value, expected[key]), (merged_key, key)  # bit-exact vs one process
            assert torch.equal(restored[key], before[key]), (restored_key, key)  # unmerge restores exactly
            changed += int(not torch.equal(value, before[key]))
    assert changed == 2 * 12  # every adapted weight changed, nothing else


def test_adapter_loads_onto_a_zero3_model_and_merge_and_unload_is_exact(zero3):
    assert zero3["result"]["rank0"]["fresh_partitioned"] and zero3["result"]["rank1"]["fresh_partitioned"]
    unloaded = torch.load(zero3["out"] / "unloaded.pt")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zero3["base"]), zero3["out"] / "adapter")
    expected = dict(model.merge_and_unload().named_parameters())
    assert unloaded.keys() == expected.keys()
    for key, value in unloaded.items():
        assert torch.equal(value, expected[key].detach()), key


def test_single_process_model_is_untouched_by_the_helpers(tiny_llama_dir):
    """Without DeepSpeed the ZeRO-3 paths are no-ops: same indices as selection on the plain weight."""
    from neuroada_plugin.kit.sharded import full_shape, gathered, is_partitioned
    from neuroada_plugin.neuroada.distributed import check_rank_agreement

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), peft_config())
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    weight = layer.base_layer.weight
    assert not is_partitioned(weight) and full_shape(weight) == weight.shape
    with gathered([weight, None], modifier_rank=0):
        pass
    assert torch.equal(layer.neuroada_indices["default"], top_abs_indices(weight, TOP_K))
    assert check_rank_agreement(model) == 12

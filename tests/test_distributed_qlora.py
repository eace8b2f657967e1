"""NeuroAda on a 4-bit base under FSDP1, FSDP2 and DeepSpeed ZeRO-3 (and 8-bit under ZeRO-3), NEAT on a 4-bit
base under FSDP2 and ZeRO-3; 2 CPU processes.

The worker (tests/distributed/qlora_sharded_worker.py) loads the base in bitsandbytes NF4 with the
``bnb_4bit_quant_storage`` each setup uses (Axolotl's FSDP-QLoRA and ZeRO-3 QLoRA: bfloat16; FSDP1:
float32, see below), trains 3 AdamW steps on each rank's half of the global batch; the reference is
one process on the whole batch over the same 4-bit base (same storage: the packed bytes and the
dequantized weight do not depend on it, which the equal references also show).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from neuroada_plugin.kit.quantized import dequantize_weight
from tests.distributed.common import (
    TOP_K,
    assert_theta_close,
    indices_of,
    launch,
    make_data,
    neat_config,
    neat_of,
    nf4_config,
    peft_config,
    reference_model,
    save_base,
    theta_of,
    top_abs_indices,
)

# Mode -> bnb_4bit_quant_storage of its NF4 base ("8bit": LLM.int8), as in the worker.
MODES = {"fsdp1": torch.float32, "fsdp2": torch.bfloat16, "zero3": torch.bfloat16, "zero3_8bit": "8bit"}
# NEAT mode -> its base: the bf16-storage NF4 base, or LLM.int8.
NEAT_MODES = {"neat_fsdp2": torch.bfloat16, "neat_zero3": torch.bfloat16, "neat_zero3_8bit": "8bit"}


def _quantization(storage):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True) if storage == "8bit" else nf4_config(storage)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora_sharded")
    base = save_base(out / "base")
    data = make_data(out / "data.pt")
    result = launch("qlora_sharded_worker.py", out, "--base", str(base), "--data", str(out / "data.pt"), timeout=400)
    references = {}
    for storage in sorted(set(MODES.values()), key=str):
        model, losses = reference_model(base, data, peft_config(), quantization_config=_quantization(storage))
        references[storage] = {"theta": theta_of(model), "indices": indices_of(model), "losses": losses, "model": model}
    for storage in sorted(set(NEAT_MODES.values()), key=str):
        model, losses = reference_model(base, data, neat_config(), quantization_config=_quantization(storage))
        references[("neat", storage)] = {"tensors": neat_of(model), "losses": losses}
    return {"out": out, "result": result, "references": references}


@pytest.mark.parametrize("mode", list(MODES))
def test_theta_on_a_4bit_base_equals_one_process(runs, mode):
    info = runs["result"]["rank0"][mode]
    reference = runs["references"][MODES[mode]]
    theta = torch.load(runs["out"] / f"{mode}_theta.pt")
    assert {v.dtype for v in theta.values()} == {torch.float32}
    assert_theta_close(theta, reference["theta"])
    # The mean of the two ranks' half-batch losses is the one-process loss on the whole batch.
    other = runs["result"]["rank1"][mode]["losses"]
    assert [(a + b) / 2 for a, b in zip(info["losses"], other, strict=True)] == pytest.approx(
        reference["losses"], rel=1e-5
    )


@pytest.mark.parametrize("mode", list(MODES))
def test_indices_are_the_top_abs_of_the_dequantized_weight_on_both_ranks(runs, mode):
    reference = runs["references"][MODES[mode]]
    model = reference["model"]
    rank0 = torch.load(runs["out"] / f"{mode}_indices_rank0.pt")
    rank1 = torch.load(runs["out"] / f"{mode}_indices_rank1.pt")
    assert rank0.keys() == rank1.keys() == reference["indices"].keys() and len(rank0) == 12
    for key, indices in rank0.items():
        assert torch.equal(indices, rank1[key]), key
        layer = model.get_submodule("base_model.model." + key.split(".neuroada_indices.")[0])
        weight = dequantize_weight(layer.base_layer)
        assert torch.equal(indices, top_abs_indices(weight.float(), TOP_K)), key
    assert runs["result"]["rank0"][mode]["agreement_buffers"] == 12


def test_the_weights_really_are_4bit_and_sharded(runs):
    result = runs["result"]["rank0"]
    assert result["fsdp1"]["weight_class"] == result["fsdp2"]["weight_class"] == "Params4bit"
    assert result["fsdp1"]["weight_dtype"] == "torch.float32" and result["fsdp2"]["weight_dtype"] == "torch.bfloat16"
    assert result["fsdp2"]["weight_is_dtensor"]
    assert result["zero3"]["weight_partitioned"] and result["zero3_8bit"]["weight_partitioned"]
    assert result["zero3"]["weight_class"] == "Params4bit" and result["zero3_8bit"]["weight_class"] == "Int8Params"


def test_fsdp1_refuses_bf16_storage_beside_float32_theta(runs):
    """Why the Axolotl validation refuses FSDP1 with a quantized base (its storage is bfloat16)."""
    wrapped = runs["result"]["rank0"]["fsdp1_bf16"]["wrapped"]
    assert wrapped.startswith("refused: ") and "uniform dtype" in wrapped, wrapped


@pytest.mark.parametrize("mode", ["zero3", "zero3_8bit"])
def test_zero3_saves_the_trained_adapter_on_rank0(runs, mode):
    saved = load_file(runs["out"] / f"{mode}_adapter" / "adapter_model.safetensors")
    theta = torch.load(runs["out"] / f"{mode}_theta.pt")
    indices = torch.load(runs["out"] / f"{mode}_indices_rank0.pt")
    saved_theta = {k.replace(".neuroada_theta", ".neuroada_theta.default"): v for k, v in saved.items() if "theta" in k}
    saved_indices = {
        k.replace(".neuroada_indices", ".neuroada_indices.default"): v for k, v in saved.items() if "indices" in k
    }
    assert {k.removeprefix("base_model.model.") for k in saved_theta} == set(theta)
    for key, value in saved_theta.items():
        assert value.dtype == torch.float32 and torch.equal(value, theta[key.removeprefix("base_model.model.")]), key
    for key, value in saved_indices.items():
        assert torch.equal(value, indices[key.removeprefix("base_model.model.")]), key


@pytest.mark.parametrize("mode", list(NEAT_MODES))
def test_neat_on_a_4bit_base_trains_like_one_process(runs, mode):
    """NEAT reads the dequantized W0 in forward and backward: under FSDP2 inside the unsharded unit, under
    ZeRO-3 with the packed bytes gathered for each read (4-bit and 8-bit). A, B, E and D equal one process on
    the same base."""
    info = runs["result"]["rank0"][mode]
    reference = runs["references"][("neat", NEAT_MODES[mode])]
    tensors = torch.load(runs["out"] / f"{mode}_theta.pt")
    assert {k.split(".")[-2] for k in tensors} == {"neat_A", "neat_B", "neat_E", "neat_D"}
    assert_theta_close(tensors, reference["tensors"])
    other = runs["result"]["rank1"][mode]["losses"]
    assert [(a + b) / 2 for a, b in zip(info["losses"], other, strict=True)] == pytest.approx(
        reference["losses"], rel=1e-5
    )
    assert info["weight_class"] == ("Int8Params" if mode.endswith("8bit") else "Params4bit")
    assert info["weight_is_dtensor"] if mode == "neat_fsdp2" else info["weight_partitioned"]


def test_neat_zero3_saves_the_trained_adapter_and_its_base_quantization(runs):
    folder = runs["out"] / "neat_zero3_adapter"
    saved = load_file(folder / "adapter_model.safetensors")
    tensors = torch.load(runs["out"] / "neat_zero3_theta.pt")
    saved = {k.removeprefix("base_model.model.") + ".default": v for k, v in saved.items() if "fingerprint" not in k}
    assert saved.keys() == tensors.keys()
    for key, value in saved.items():
        assert value.dtype == torch.float32 and torch.equal(value, tensors[key]), key
    (group,) = json.loads((folder / "adapter_config.json").read_text())["base_quantization"]
    assert group["settings"]["kind"] == "bnb_4bit" and group["settings"]["compress_statistics"] is True
    assert len(group["modules"]) == 12

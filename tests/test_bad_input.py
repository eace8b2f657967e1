"""Every documented bad input raises its documented error and changes nothing."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from neuroada_plugin import AdapterCheckpointError, MergeError, NeuroAdaConfig, NeuroAdaLayer, UnsupportedTargetError

from tiny_models import tiny_llama

TOKENS = torch.tensor([[5, 17, 99, 1024, 7, 3]])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_k": 0}, "top_k must be an integer >= 1"),
        ({"top_k": -3}, "top_k must be an integer >= 1"),
        ({"top_k": 1.5}, "top_k must be an integer >= 1"),
        ({"top_k": True}, "top_k must be an integer >= 1"),
        ({"selection": "gradient"}, "selection must be one of"),
        ({"theta_dtype": "int8"}, "theta_dtype must be one of"),
        ({"seed": "x"}, "seed must be an integer"),
        ({"target_modules": []}, "target_modules is empty"),
        ({"target_modules": "  "}, "target_modules is an empty string"),
        ({"layers_pattern": "layers"}, "layers_pattern only makes sense together with layers_to_transform"),
        ({"modules_to_save": "lm_head"}, "modules_to_save must be a list"),
        ({"trainable_token_indices": 5}, "trainable_token_indices must be a list"),
    ],
)
def test_invalid_config_values_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NeuroAdaConfig(**kwargs)


def _linear_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_top_k_larger_than_in_features_names_layers_and_changes_nothing():
    model = tiny_llama()
    before = _linear_weights(model)
    # q/k/v/o/gate/up have in_features=64, down_proj has 128: all but down_proj fail
    with pytest.raises(
        ValueError, match=r"top_k=100 exceeds in_features=64 of layer model\.layers\.0\.self_attn\.q_proj"
    ):
        get_peft_model(model, NeuroAdaConfig(top_k=100))
    assert not any(isinstance(m, NeuroAdaLayer) for m in model.modules())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "neuroada_theta" not in n)


def test_conv1d_target_is_rejected_clearly():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0))
    with pytest.raises(UnsupportedTargetError, match=r"transformer\.h\.0\.attn\.c_attn: GPT-2 style Conv1D"):
        get_peft_model(model, NeuroAdaConfig(target_modules=["c_attn"]))
    assert not any(isinstance(m, NeuroAdaLayer) for m in model.modules())


def test_non_linear_target_is_rejected_clearly():
    with pytest.raises(UnsupportedTargetError, match=r"model\.embed_tokens \(Embedding\): only torch\.nn\.Linear"):
        get_peft_model(tiny_llama(), NeuroAdaConfig(target_modules=["embed_tokens"]))


class FakeQuantLinear(torch.nn.Linear):
    """Stands in for bitsandbytes' Linear4bit: an nn.Linear subclass carrying a quant_state."""

    quant_state = object()


def test_quantized_target_is_rejected_clearly():
    model = tiny_llama()
    model.model.layers[1].mlp.up_proj = FakeQuantLinear(64, 128, bias=False)
    with pytest.raises(
        UnsupportedTargetError, match=r"model\.layers\.1\.mlp\.up_proj \(FakeQuantLinear\): it is quantized"
    ):
        get_peft_model(model, NeuroAdaConfig())
    assert not any(isinstance(m, NeuroAdaLayer) for m in model.modules())


@pytest.fixture
def saved_adapter(tmp_path):
    model = get_peft_model(tiny_llama(), NeuroAdaConfig(top_k=2, init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_adapter_on_base_with_other_shapes_names_layer_and_both_shapes(saved_adapter):
    other_base = tiny_llama(intermediate_size=96)
    with pytest.raises(AdapterCheckpointError) as info:
        PeftModel.from_pretrained(other_base, saved_adapter)
    message = str(info.value)
    assert "model.layers.0.mlp.gate_proj" in message
    assert "[128, 2]" in message and "[96, 64]" in message


def _rewrite(adapter_dir, edit):
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


KEY = "base_model.model.model.layers.1.self_attn.o_proj.neuroada_indices"


def test_float_indices_in_file_are_rejected(saved_adapter):
    _rewrite(saved_adapter, lambda t: t.__setitem__(KEY, t[KEY].to(torch.float32)))
    with pytest.raises(AdapterCheckpointError, match=r"layers\.1\.self_attn\.o_proj.*dtype torch\.float32.*integers"):
        PeftModel.from_pretrained(tiny_llama(), saved_adapter)


def test_out_of_range_indices_in_file_are_rejected(saved_adapter):
    def corrupt(tensors):
        tensors[KEY][3, 1] = 64  # in_features of o_proj is 64

    _rewrite(saved_adapter, corrupt)
    with pytest.raises(
        AdapterCheckpointError, match=r"layers\.1\.self_attn\.o_proj.*span \[\d+, 64\].*shape \[64, 64\]"
    ):
        PeftModel.from_pretrained(tiny_llama(), saved_adapter)


def test_negative_indices_in_file_are_rejected(saved_adapter):
    def corrupt(tensors):
        tensors[KEY][0, 0] = -1

    _rewrite(saved_adapter, corrupt)
    with pytest.raises(AdapterCheckpointError, match=r"span \[-1, "):
        PeftModel.from_pretrained(tiny_llama(), saved_adapter)


def test_int32_indices_are_accepted_and_widened(saved_adapter):
    reference = PeftModel.from_pretrained(tiny_llama(), saved_adapter)
    with torch.no_grad():
        expected = reference(TOKENS).logits
    _rewrite(saved_adapter, lambda t: t.__setitem__(KEY, t[KEY].to(torch.int32)))
    model = PeftModel.from_pretrained(tiny_llama(), saved_adapter)
    assert model.base_model.model.model.layers[1].self_attn.o_proj.neuroada_indices["default"].dtype == torch.int64
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, expected)


def test_nan_theta_merge_raises_and_leaves_weights_untouched():
    model = get_peft_model(tiny_llama(), NeuroAdaConfig(init_weights=False))
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        layer.neuroada_theta["default"][5, 0] = float("nan")
    before = _linear_weights(model)
    with pytest.raises(MergeError, match=r"layers\.1\.mlp\.down_proj.*1 non-finite value"):
        model.merge_adapter()
    with pytest.raises(MergeError, match=r"layers\.1\.mlp\.down_proj"):
        model.merge_and_unload()
    # every layer was checked before any was touched: nothing merged, nothing unloaded
    assert not any(m.merged for m in model.modules() if isinstance(m, NeuroAdaLayer))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "neuroada_theta" not in n)


def test_overflowing_merge_in_half_precision_raises():
    model = get_peft_model(tiny_llama(dtype=torch.float16), NeuroAdaConfig())
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.neuroada_theta["default"][0, 0] = 1e6  # beyond float16's max (65504)
    weight_before = layer.get_base_layer().weight.detach().clone()
    with pytest.raises(MergeError, match="float16"):
        layer.merge()
    assert torch.equal(layer.get_base_layer().weight, weight_before) and not layer.merged


def test_duplicate_indices_in_a_row_are_rejected(saved_adapter):
    def corrupt(tensors):
        tensors[KEY][2, 1] = tensors[KEY][2, 0]

    _rewrite(saved_adapter, corrupt)
    with pytest.raises(AdapterCheckpointError, match=r"layers\.1\.self_attn\.o_proj.*repeats an input index"):
        PeftModel.from_pretrained(tiny_llama(), saved_adapter)

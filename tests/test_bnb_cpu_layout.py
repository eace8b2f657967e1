"""Reading and undoing bitsandbytes' CPU-packed 4-bit layout (neuroada_plugin/kit/bnb_cpu_layout.py), on any CPU.

The layout is produced here by bitsandbytes' own conversion (``_convert_weight_packed_for_cpu``, what
``Linear4bit.forward`` calls on CPUs with AVX512-BF16), which is pure torch, so these checks run on
every CPU; nothing here runs the packed kernel. The reference for a packed weight is independent of
the plugin: bitsandbytes' dequantization of the original codes with each block scale rounded to
bfloat16 (:func:`bnb_layouts.dequantized_as_packed`). The hooks that keep the original scales and
restore the layout around training forwards are checked on real models in tests/test_quantized.py.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import _convert_weight_packed_for_cpu, dequantize_4bit

from neuroada_plugin.kit.bnb_cpu_layout import (
    guard_4bit_layers,
    is_packed_for_cpu,
    restore_standard_layout_,
    standard_4bit_state,
    unguard_4bit_layers,
)

from bnb_layouts import dequantized_as_loaded, dequantized_as_packed

SETTINGS = [
    pytest.param(quant_type, nested, dtype, storage, id=f"{quant_type}-{'double-' if nested else ''}{name}")
    for quant_type in ("nf4", "fp4")
    for nested in (False, True)
    for dtype, storage, name in (
        (torch.float32, torch.uint8, "fp32"),
        (torch.bfloat16, torch.bfloat16, "bf16-storage"),  # FSDP-QLoRA's bnb_4bit_quant_storage
    )
]


def quantized_layer(quant_type: str, nested: bool, dtype: torch.dtype, storage: torch.dtype) -> bnb.nn.Linear4bit:
    """A 4-bit layer of [96, 256] (blocks of 64 along each row; 3 tiles of 32 rows) with seeded weights."""
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(
        256, 96, bias=False, compress_statistics=nested, quant_type=quant_type, quant_storage=storage
    )
    layer.weight = bnb.nn.Params4bit(
        (0.05 * torch.randn(96, 256)).to(dtype),
        requires_grad=False,
        compress_statistics=nested,
        quant_type=quant_type,
        quant_storage=storage,
        module=layer,
    )
    return layer.to("cpu")


def pack(layer: bnb.nn.Linear4bit) -> None:
    """What ``Linear4bit.forward`` does to the weight on an AVX512-BF16 CPU (without running the kernel)."""
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state
    )


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.uint8).clone()


@pytest.mark.parametrize(("quant_type", "nested", "dtype", "storage"), SETTINGS)
def test_a_packed_weight_reads_as_its_codes_with_bf16_block_scales(quant_type, nested, dtype, storage):
    layer = quantized_layer(quant_type, nested, dtype, storage)
    codes, reference = as_bytes(layer.weight.data), dequantized_as_packed(layer)
    pack(layer)
    packed = as_bytes(layer.weight.data)
    assert is_packed_for_cpu(layer.weight) and tuple(packed.shape) == (96, 128)

    data, state = standard_4bit_state(layer.weight)
    assert data.dtype == storage and torch.equal(as_bytes(data), codes)
    assert not state.nested and state is not layer.weight.quant_state
    assert torch.equal(dequantize_4bit(data, state), reference)
    # Reading changed nothing: the layer is still packed, with the same bytes.
    assert is_packed_for_cpu(layer.weight) and torch.equal(as_bytes(layer.weight.data), packed)


@pytest.mark.parametrize(("quant_type", "nested", "dtype", "storage"), SETTINGS)
def test_restoring_the_standard_layout_is_exact_and_packs_back_to_the_same_bytes(quant_type, nested, dtype, storage):
    layer = quantized_layer(quant_type, nested, dtype, storage)
    weight_object, codes, reference = layer.weight, as_bytes(layer.weight.data), dequantized_as_packed(layer)
    assert not restore_standard_layout_(layer)  # an unpacked layer is left alone
    pack(layer)
    packed, packed_scales = as_bytes(layer.weight.data), layer.weight.quant_state.absmax.clone()

    assert restore_standard_layout_(layer)
    assert layer.weight is weight_object and layer.weight.quant_state is layer.quant_state
    assert not is_packed_for_cpu(layer.weight)
    assert layer.weight.data.dtype == storage and torch.equal(as_bytes(layer.weight.data), codes)
    assert torch.equal(dequantize_4bit(layer.weight.data, layer.weight.quant_state), reference)
    # The standard kernel computes with that weight (the packed kernel drops the input's gradient; this one not).
    x = torch.randn(3, 256, requires_grad=True)
    out = layer(x)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(x.grad, torch.ones(3, 96) @ reference.float(), rtol=1e-5, atol=1e-5)

    pack(layer)  # round trip: packing the restored layer gives the first packing back
    assert torch.equal(as_bytes(layer.weight.data), packed)
    assert torch.equal(layer.weight.quant_state.absmax, packed_scales)


@pytest.mark.parametrize("nested", [False, True])
def test_state_dict_of_a_packed_layer_saves_the_weights_it_computes_with(nested):
    """bitsandbytes' own inverse on save leaves the block scales transposed without double quantization
    (the saved layer computes garbage); the guard restores the layout exactly first."""
    model = torch.nn.Sequential(quantized_layer("nf4", nested, torch.float32, torch.uint8))
    layer = model[0]
    reference = dequantized_as_packed(layer)
    assert guard_4bit_layers(model) == 1 and guard_4bit_layers(model) == 1  # idempotent: one set of hooks
    assert len(layer._forward_pre_hooks) == 1 and len(layer._state_dict_pre_hooks) == 1
    pack(layer)

    saved = model.state_dict()
    assert not is_packed_for_cpu(layer.weight)
    reloaded = bnb.nn.Params4bit.from_prequantized(
        saved["0.weight"],
        {key.removeprefix("0.weight."): value for key, value in saved.items() if key.startswith("0.weight.")},
        requires_grad=False,
        device="cpu",
    )
    assert torch.equal(dequantize_4bit(reloaded.data, reloaded.quant_state), reference)

    pack(layer)
    unguard_4bit_layers(model)
    assert not layer._forward_pre_hooks and not layer._state_dict_pre_hooks
    assert not is_packed_for_cpu(layer.weight)
    assert torch.equal(dequantized_as_loaded(layer), reference)

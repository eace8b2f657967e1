"""The two layouts bitsandbytes gives a 4-bit weight on the CPU, chosen on purpose by the tests.

On a CPU with AVX512-BF16, bitsandbytes packs a ``Linear4bit`` weight for its bf16 kernel on the
first forward in eval mode with an input that needs no gradient; elsewhere it never does. A test
that lets the CPU decide compares numbers from two kernels (they differ by ~1e-3), so the 4-bit
tests pick the layout: ``standard`` switches the packing off (the layer flag bitsandbytes reads),
``packed`` packs every layer by an eval forward, as users on such CPUs get after their first
evaluation. ``packed`` needs the kernel, so it runs only where the CPU has it (``PACKING_CPU``);
the reading and restoring of the layout is pure torch and tested on every CPU
(``tests/test_bnb_cpu_layout.py``).
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import has_avx512bf16

from neuroada_plugin.kit.bnb_cpu_layout import is_packed_for_cpu, standard_4bit_state

PACKING_CPU = bool(has_avx512bf16())
NO_PACKING_REASON = "bitsandbytes packs 4-bit weights only on CPUs with AVX512-BF16; this CPU never has that layout"
LAYOUTS = ["standard", pytest.param("packed", marks=pytest.mark.skipif(not PACKING_CPU, reason=NO_PACKING_REASON))]


def load_bnb(folder, settings: dict, **kwargs) -> torch.nn.Module:
    """The checkpoint in ``folder`` loaded on the CPU with ``BitsAndBytesConfig(**settings)`` (load warnings muted)."""
    import warnings

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=BitsAndBytesConfig(**settings), device_map="cpu", **kwargs
        )


def linear4bit_layers(model: torch.nn.Module) -> list[bnb.nn.Linear4bit]:
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def keep_standard_layout(model: torch.nn.Module) -> None:
    """Switch bitsandbytes' CPU packing off for every 4-bit layer of ``model`` (none is packed yet)."""
    for layer in linear4bit_layers(model):
        assert not is_packed_for_cpu(layer.weight)
        layer.support_avx512bf16_for_cpu = False


def pack_by_eval_forward(model: torch.nn.Module, tokens: torch.Tensor) -> None:
    """One eval forward without gradients: bitsandbytes packs every 4-bit layer, as after a user's evaluation."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    with torch.no_grad():
        model(tokens)
    for module, training in modes.items():  # each module back in its own mode
        module.training = training
    layers = linear4bit_layers(model)
    assert layers and all(is_packed_for_cpu(layer.weight) for layer in layers)


def use_layout(model: torch.nn.Module, layout: str, tokens: torch.Tensor) -> None:
    if layout == "standard":
        keep_standard_layout(model)
    else:
        pack_by_eval_forward(model, tokens)


def standard_bytes(weight: torch.Tensor) -> torch.Tensor:
    """The codes of a 4-bit weight in bitsandbytes' standard layout (the weight itself for other tensors)."""
    if not isinstance(weight, bnb.nn.Params4bit):
        return weight.detach()
    return standard_4bit_state(weight)[0].view(torch.uint8)


def dequantized_as_loaded(layer: bnb.nn.Linear4bit) -> torch.Tensor:
    """The weight of an unpacked 4-bit layer, read by bitsandbytes itself (take it before any packing)."""
    assert not is_packed_for_cpu(layer.weight)
    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).clone()


def dequantized_as_packed(layer: bnb.nn.Linear4bit) -> torch.Tensor:
    """What the layer computes with once bitsandbytes has packed it (take it before the packing).

    Independent of the plugin's reader: the same codes with each block scale rounded to bfloat16
    (double quantization resolved first), dequantized by bitsandbytes from the standard layout.
    """
    weight = layer.weight
    state = weight.quant_state
    assert not is_packed_for_cpu(weight)
    scales = state.absmax
    if state.nested:
        scales = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    rounded = bnb.functional.QuantState(
        absmax=scales.float().to(torch.bfloat16).float(),
        shape=state.shape,
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=state.dtype,
    )
    return bnb.functional.dequantize_4bit(weight.data, rounded)


def quantization_layouts(quantizations: list[str]) -> list:
    """``(quantization, layout)`` parameters: both layouts for 4-bit settings, ``standard`` for 8-bit."""
    params = []
    for quantization in quantizations:
        for layout in ("standard", "packed"):
            if layout == "packed" and not quantization.startswith(("nf4", "fp4")):
                continue
            marks = pytest.mark.skipif(not PACKING_CPU, reason=NO_PACKING_REASON) if layout == "packed" else ()
            params.append(pytest.param(quantization, layout, marks=marks, id=f"{quantization}-{layout}"))
    return params

"""Quantized base weights (bitsandbytes 4-bit and 8-bit): which layers are, and their weight as a float tensor.

A method that reads its frozen weight (selection, a fingerprint, a weight-dependent update, a merge)
reads a quantized layer through :func:`dequantize_weight`: one layer at a time, transiently. The
4-bit CPU-packed layout bitsandbytes uses on AVX512-BF16 CPUs is read by :mod:`.bnb_cpu_layout`.

bitsandbytes is imported only when a model already holds bitsandbytes layers (it is then in
``sys.modules``).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .bnb_cpu_layout import standard_4bit_state

__all__ = ["SUPPORTED_QUANTIZED_LAYERS", "bnb_layer_kind", "dequantize_weight"]

# Quantized layer kinds a method may adapt, as named in MethodSpec.quantized_layers and in messages.
SUPPORTED_QUANTIZED_LAYERS = {
    "bnb_4bit": "bitsandbytes Linear4bit (load_in_4bit, NF4 or FP4, any compute dtype)",
    "bnb_8bit": "bitsandbytes Linear8bitLt (load_in_8bit)",
}


def bnb_layer_kind(module: nn.Module) -> str | None:
    """``"bnb_4bit"`` / ``"bnb_8bit"`` for a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (or subclass), else ``None``.

    Never imports bitsandbytes: a model can only hold its layers once it has been imported.
    """
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return "bnb_4bit"
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "bnb_8bit"
    return None


def _int8_scales(layer: nn.Module) -> torch.Tensor | None:
    """Row scales of an int8 weight: on the weight until the first forward, on ``layer.state`` after it."""
    scales = getattr(layer.weight, "SCB", None)
    if scales is None:
        scales = getattr(getattr(layer, "state", None), "SCB", None)
    return scales


def dequantize_weight(layer: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` floating-point weight a bitsandbytes layer computes with (a new tensor).

    4-bit: ``dequantize_4bit`` (in the dtype the weight had when it was quantized), of the standard
    layout also when bitsandbytes has packed the weight for its CPU kernel. 8-bit:
    ``int8 * SCB / 127`` per row, in float32; a ``Linear8bitLt`` that keeps fp16 weights
    (``has_fp16_weights=True``) returns a copy of them.
    """
    import bitsandbytes as bnb

    weight = layer.weight
    kind = bnb_layer_kind(layer)
    if kind == "bnb_4bit":
        if weight.quant_state is None:  # not quantized yet (e.g. still on the meta device / before .to())
            return weight.data.clone()
        return bnb.functional.dequantize_4bit(*standard_4bit_state(weight))
    if kind == "bnb_8bit":
        if weight.dtype.is_floating_point:
            return weight.data.clone()
        scales = _int8_scales(layer)
        if scales is None:
            raise RuntimeError(f"{type(layer).__name__}: int8 weight without row scales (SCB); cannot dequantize it.")
        return bnb.functional.int8_vectorwise_dequant(weight.data, scales.to(weight.device))
    raise TypeError(f"{type(layer).__name__} is not a bitsandbytes Linear4bit/Linear8bitLt layer.")

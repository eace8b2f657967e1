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

__all__ = ["SUPPORTED_QUANTIZED_LAYERS", "bnb_layer_kind", "dequantize_int8", "dequantize_weight", "quantization_settings", "record_base_quantization", "recorded_quantization"]

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


def dequantize_int8(layer: nn.Module, weight: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """``int8 * scales / 127`` per row in float32, or a copy of a weight bitsandbytes keeps in floating point.

    ``weight`` is ``layer``'s int8 weight now or one it had (a merge's snapshot); ``layer`` names the error.
    """
    import bitsandbytes as bnb

    if weight.dtype.is_floating_point:
        return weight.data.clone()
    if scales is None:
        raise RuntimeError(f"{type(layer).__name__}: int8 weight without row scales (SCB); cannot dequantize it.")
    return bnb.functional.int8_vectorwise_dequant(weight.data, scales.to(weight.device))


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
        if getattr(weight, "quant_state", None) is None and getattr(layer, "quant_state", None) is not None:
            # FSDP re-creates the parameter when it unshards it (plain storage, no quant_state): bitsandbytes'
            # own forward takes the layer's copy of the state back onto it (fix_4bit_weight_quant_state_from_module).
            weight.quant_state = layer.quant_state
        if getattr(weight, "quant_state", None) is None:  # not quantized yet (e.g. on the meta device / before .to())
            return weight.data.clone()
        return bnb.functional.dequantize_4bit(*standard_4bit_state(weight))
    if kind == "bnb_8bit":
        return dequantize_int8(layer, weight, _int8_scales(layer))
    raise TypeError(f"{type(layer).__name__} is not a bitsandbytes Linear4bit/Linear8bitLt layer.")


def quantization_settings(layer: nn.Module, loaded_dtype: torch.dtype | None = None) -> dict[str, object] | None:
    """What reproduces ``layer``'s quantized weight from its full-precision original, as JSON-ready values.

    A method whose update is a function of the frozen weight learns against the *dequantized* weight;
    a merge into the full-precision original needs that weight again, and re-quantizing the original
    with these settings gives it (:func:`neuroada_plugin.kit.quantized_write.reproduce_quantized`).
    ``None`` for a layer that is not quantized (an 8-bit layer that keeps fp16 weights).
    ``loaded_dtype``: the dtype the model was loaded in (an int8 weight does not remember it; bitsandbytes
    quantizes from it through fp16, so a bf16 load rounds twice). 4-bit weights record their own.
    """
    kind = bnb_layer_kind(layer)
    weight = layer.weight
    if kind == "bnb_4bit" and weight.quant_state is not None:
        _, state = standard_4bit_state(weight)
        return {
            "kind": kind,
            "quant_type": str(weight.quant_type),
            "blocksize": int(weight.blocksize),
            "compress_statistics": bool(weight.compress_statistics),
            "dtype": str(state.dtype).removeprefix("torch."),  # the dtype the weight had when it was quantized
        }
    if kind == "bnb_8bit" and not weight.dtype.is_floating_point:
        dtype = str(loaded_dtype or torch.float16).removeprefix("torch.")
        return {"kind": kind, "dtype": dtype}  # bitsandbytes quantizes int8 rows from it, cast to fp16
    return None


def record_base_quantization(config: object, module_name: str, settings: dict[str, object] | None) -> None:
    """Note in ``config.base_quantization`` that ``module_name`` was quantized with ``settings`` (``None``: it is
    not quantized); saved with the adapter in ``adapter_config.json``, one group per distinct setting."""
    groups = [group for group in (getattr(config, "base_quantization", None) or []) if isinstance(group, dict)]
    for group in groups:
        if module_name in group.get("modules", []):
            group["modules"].remove(module_name)
    for group in groups if settings is not None else []:
        if group.get("settings") == settings:
            group["modules"] = sorted({*group["modules"], module_name})
            break
    else:
        if settings is not None:
            groups.append({"settings": dict(settings), "modules": [module_name]})
    config.base_quantization = [group for group in groups if group.get("modules")] or None


def recorded_quantization(config: object, module_name: str) -> dict[str, object] | None:
    """The settings ``config`` (a config object or ``adapter_config.json`` as a dict) records for ``module_name``."""
    groups = config.get("base_quantization") if isinstance(config, dict) else getattr(config, "base_quantization", None)
    for group in groups or []:
        if isinstance(group, dict) and module_name in group.get("modules", []):
            return group.get("settings")
    return None

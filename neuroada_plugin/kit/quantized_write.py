"""Writing a merged weight into a bitsandbytes layer and undoing it exactly; the trained-against weight of an original.

A merge into a quantized base (4-bit or 8-bit) dequantizes the layer, changes it and quantizes it
again with the layer's own settings, which rounds. What was there before is kept as a *snapshot*
(the quantized tensors themselves, no float copy), so an unmerge restores it byte for byte and a
method whose update is a function of the weight can still read the pre-merge weight from it.

:func:`reproduce_quantized` is the other direction, for the streaming merge: from the full-precision
original and the settings a layer recorded when the adapter was created
(:func:`~.quantized.quantization_settings`), the dequantized weight the adapter was trained
against. bitsandbytes is imported only when one of these is called.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .bnb_cpu_layout import standard_4bit_state
from .quantized import bnb_layer_kind, dequantize_int8

__all__ = ["dequantize_snapshot", "quantized_snapshot", "reproduce_quantized", "restore_quantized", "set_quantized"]


def quantized_snapshot(layer: nn.Module) -> Any:
    """The layer's quantized weight as it is now (the objects themselves: nothing is copied)."""
    if bnb_layer_kind(layer) == "bnb_4bit":
        return layer.weight
    return layer.weight, layer.state.CB, layer.state.SCB


def dequantize_snapshot(layer: nn.Module, snapshot: Any) -> torch.Tensor:
    """The ``[out, in]`` float weight ``snapshot`` (from :func:`quantized_snapshot` of ``layer``) stands for."""
    import bitsandbytes as bnb

    if bnb_layer_kind(layer) == "bnb_4bit":
        return bnb.functional.dequantize_4bit(*standard_4bit_state(snapshot))
    weight, _, scales = snapshot
    return dequantize_int8(layer, weight, scales if scales is not None else getattr(weight, "SCB", None))


def set_quantized(layer: nn.Module, dense: torch.Tensor) -> None:
    """Quantize ``dense`` (``[out, in]``) into ``layer`` with the layer's own settings (this rounds)."""
    import bitsandbytes as bnb

    weight = layer.weight
    if bnb_layer_kind(layer) == "bnb_4bit":
        # The same settings (blocksize, quant type, double quantization, storage dtype) as before.
        settings = {
            key: value
            for key, value in weight.__dict__.items()
            if not key.startswith("_") and key not in ("data", "quant_state", "bnb_quantized")
        }
        settings["requires_grad"] = False
        layer.weight = bnb.nn.Params4bit(dense.to("cpu"), **settings).to(weight.device)
        return
    layer.weight = bnb.nn.Int8Params(
        dense.to("cpu"), requires_grad=False, has_fp16_weights=weight.has_fp16_weights
    ).to(weight.device)
    # Clears the state's CB/SCB: the next forward moves the new weight's into it (bitsandbytes' init_8bit_state).
    layer.state.reset_grads()


def restore_quantized(layer: nn.Module, snapshot: Any) -> None:
    """Put ``snapshot`` (from :func:`quantized_snapshot`) back into ``layer``: its bytes, exactly."""
    if bnb_layer_kind(layer) == "bnb_4bit":
        layer.weight = snapshot
        layer.quant_state = snapshot.quant_state
        return
    layer.state.reset_grads()  # clears CB/SCB too: restore them afterwards
    layer.weight, layer.state.CB, layer.state.SCB = snapshot


def reproduce_quantized(original: torch.Tensor, settings: Mapping[str, Any]) -> torch.Tensor:
    """The dequantized weight a bitsandbytes layer loaded from ``original`` with ``settings`` computes with.

    Quantizes as loading does (4-bit: ``quantize_4bit`` from the weight in ``settings["dtype"]``; 8-bit:
    row-wise int8 from the weight in ``settings["dtype"]`` cast to fp16), then dequantizes; on ``original``'s
    device.
    """
    import bitsandbytes.functional as bnbf

    kind = settings.get("kind")
    if kind == "bnb_4bit":
        dtype = getattr(torch, str(settings["dtype"]))
        codes, state = bnbf.quantize_4bit(
            original.to(dtype).contiguous(),
            blocksize=int(settings["blocksize"]),
            compress_statistics=bool(settings["compress_statistics"]),
            quant_type=str(settings["quant_type"]),
        )
        return bnbf.dequantize_4bit(codes, state)
    if kind == "bnb_8bit":
        loaded = original.to(getattr(torch, str(settings.get("dtype", "float16"))))
        codes, scales, _ = bnbf.int8_vectorwise_quant(loaded.to(torch.float16).contiguous())
        return bnbf.int8_vectorwise_dequant(codes, scales)
    raise ValueError(f"Unknown quantization kind {kind!r} (expected 'bnb_4bit' or 'bnb_8bit').")

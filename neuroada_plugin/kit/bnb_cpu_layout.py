"""bitsandbytes' CPU-packed layout of 4-bit weights: read it, and undo it exactly when it would do harm.

On a CPU with AVX512-BF16 (Intel Sapphire Rapids and later, AMD Zen 4), bitsandbytes 0.49+ rewrites a
``Linear4bit`` weight in place on its first forward in eval mode with an input that does not require
grad (``_convert_weight_packed_for_cpu``): the codes go from ``[n/2, 1]`` to an ``[out, in/2]``
tile-interleaved layout, the block scales (absmax) are dequantized from double quantization and
rounded to bfloat16, and ``quant_state.packing_format_for_cpu`` is set. Every later call then runs a
bf16 kernel. Three things break on such a layer, in bitsandbytes itself and in PEFT's LoRA alike:

* ``bitsandbytes.functional.dequantize_4bit`` reads the packed bytes as if they were not: selection
  and merges see a scrambled matrix;
* the packed matmul has no backward for its input: a training forward after an evaluation returns
  no gradient through the frozen layer, silently;
* saving (``_save_to_state_dict``) undoes the packing with a best-effort inverse that, without double
  quantization, leaves the block scales transposed: the layer computes garbage from then on.

This module reads the packed layout without touching the layer (:func:`standard_4bit_state`), puts a
layer back into bitsandbytes' standard layout exactly (:func:`restore_standard_layout_`), and
:func:`guard_4bit_layers` hooks the 4-bit layers of a model so that the standard layout is restored
before a forward in training mode or one that needs the input's gradient, and before ``state_dict``
(inference in eval mode keeps bitsandbytes' fast packed kernel). Right before bitsandbytes
packs a layer, the hook keeps a reference to the block scales it is about to replace, so that the
restored layer computes with exactly the weights it was loaded with (the bf16 rounding is undone);
a layer packed before any hook saw it is restored to what it computes with when packed (its codes
and its bf16 block scales, without double quantization). The next eval forward packs it again.
While a layer stays packed, the kept scales cost what bitsandbytes held before packing (with
blocks of 64: 1/64 byte per weight with double quantization, 1/16 without) besides its bf16 copy.

Pure torch: the packed layout can be read and undone on any CPU, with or without AVX512-BF16.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = [
    "guard_4bit_layers",
    "is_packed_for_cpu",
    "restore_standard_layout_",
    "standard_4bit_state",
    "unguard_4bit_layers",
]

# bitsandbytes' tile height in ``_convert_weight_packed_for_cpu`` (its default ``block_n``).
_PACK_BLOCK_N = 32
# Attribute on a QuantState: the fields bitsandbytes' packing replaced, kept by the guard's hook.
_STANDARD_FIELDS = "_neuroada_standard_fields"
# Attribute on a guarded layer: the hook handles (so that unguarding removes exactly ours).
_GUARD_HANDLES = "_neuroada_layout_guard"


def is_packed_for_cpu(weight: Any) -> bool:
    """Whether a ``Params4bit`` holds bitsandbytes' CPU-packed layout (see the module docstring)."""
    return bool(getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False))


def _standard_codes(packed: torch.Tensor, quant_state: Any) -> torch.Tensor:
    """The 4-bit codes of a packed ``[out, in/2]`` weight in bitsandbytes' standard byte layout.

    Packed: within each tile of 32 rows, the codes of two neighbouring columns of 32 rows are one
    64-code group, whose first 32 codes are the low nibbles and last 32 the high nibbles of 32
    bytes. Standard: the ``[out, in]`` codes row by row, two per byte, the first in the high nibble.
    """
    rows, half_columns = packed.shape
    nibbles = packed.reshape(-1, _PACK_BLOCK_N)
    groups = torch.cat([nibbles & 0xF, nibbles >> 4], dim=-1)  # [..., 64] codes
    codes = groups.reshape(rows // _PACK_BLOCK_N, half_columns, _PACK_BLOCK_N, 2).transpose(1, 2)
    codes = codes.reshape(-1)
    standard = (codes[0::2] << 4) | codes[1::2]
    standard = standard.reshape(quant_state.original_qshape)
    storage = getattr(quant_state, "original_storage_type", None)
    return standard.view(storage) if storage is not None else standard


def _standard_fields(quant_state: Any) -> dict[str, Any]:
    """The QuantState fields of the standard layout for a packed state.

    The fields kept right before packing when a guard saw it happen (exact: the weights as loaded);
    otherwise the packed bf16 block scales in row-major block order, without double quantization
    (exact: the weights the packed layer computes with).
    """
    kept = getattr(quant_state, _STANDARD_FIELDS, None)
    if kept is not None:
        return kept
    scales = quant_state.absmax.T.reshape(-1)  # packed: [in / blocksize, out]
    return {
        "absmax": scales.float(),
        "nested": False,
        "state2": None,
        "offset": None,
        "dtype": quant_state.original_dtype,
    }


def standard_4bit_state(weight: Any) -> tuple[torch.Tensor, Any]:
    """``(data, quant_state)`` of a 4-bit weight in bitsandbytes' standard layout, as new objects.

    For an unpacked weight, the weight's own data and state. For a packed one, the layer is left
    as it is; ``bitsandbytes.functional.dequantize_4bit(*standard_4bit_state(w))`` is its weight.
    """
    state = weight.quant_state
    if not is_packed_for_cpu(weight):
        return weight.data, state
    from bitsandbytes.functional import QuantState

    fields = _standard_fields(state)
    standard = QuantState(
        absmax=fields["absmax"],
        shape=state.shape,
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=fields["dtype"],
        offset=fields["offset"],
        state2=fields["state2"],
    )
    return _standard_codes(weight.data, state), standard


def restore_standard_layout_(layer: nn.Module) -> bool:
    """Put a packed bitsandbytes ``Linear4bit`` back into the standard layout, in place; ``True`` if it was packed.

    The ``Params4bit`` and its ``QuantState`` stay the same objects (anything holding them stays
    valid); only their contents change back. A no-op on an unpacked layer.
    """
    weight = layer.weight
    if not is_packed_for_cpu(weight):
        return False
    state = weight.quant_state
    fields = _standard_fields(state)
    weight.data = _standard_codes(weight.data, state)
    state.absmax, state.nested, state.dtype = fields["absmax"], fields["nested"], fields["dtype"]
    state.offset = fields["offset"]
    if fields["nested"]:
        state.state2 = fields["state2"]
    elif hasattr(state, "state2"):
        del state.state2
    state.packing_format_for_cpu = False
    if hasattr(state, _STANDARD_FIELDS):
        delattr(state, _STANDARD_FIELDS)
    return True


def _will_pack(layer: nn.Module, x: torch.Tensor) -> bool:
    """bitsandbytes' own condition (``Linear4bit.forward``) for packing the layer on this call."""
    return (
        x.device.type == "cpu"
        and bool(getattr(layer, "support_avx512bf16_for_cpu", False))
        and not layer.training
        and not x.requires_grad
        and not is_packed_for_cpu(layer.weight)
    )


def _before_forward(layer: nn.Module, args: tuple[Any, ...]) -> None:
    if not args or not isinstance(args[0], torch.Tensor):
        return
    x = args[0]
    weight = layer.weight
    if getattr(weight, "quant_state", None) is None:
        return
    if is_packed_for_cpu(weight):
        # Training resumes in the layout (and on the weights) it had before an evaluation, and the packed
        # kernel, which drops the input's gradient, never runs where that gradient is needed.
        if layer.training or (torch.is_grad_enabled() and x.requires_grad):
            restore_standard_layout_(layer)
    elif _will_pack(layer, x):
        # Keep what the packing replaces (references, no copy), to restore the layer exactly later.
        state = weight.quant_state
        setattr(
            state,
            _STANDARD_FIELDS,
            {
                "absmax": state.absmax,
                "nested": state.nested,
                "state2": getattr(state, "state2", None),
                "offset": getattr(state, "offset", None),
                "dtype": state.dtype,
            },
        )


def _before_state_dict(layer: nn.Module, prefix: str, keep_vars: bool) -> None:
    # bitsandbytes' own inverse (run by _save_to_state_dict) is lossy and, without double quantization, wrong.
    restore_standard_layout_(layer)


def _bnb_4bit_layers(modules: Iterable[nn.Module]) -> list[nn.Module]:
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:  # a model can only hold bitsandbytes layers once it has been imported
        return []
    return [module for module in modules if isinstance(module, bnb.nn.Linear4bit)]


def guard_4bit_layers(model: nn.Module) -> int:
    """Hook every bitsandbytes ``Linear4bit`` of ``model`` (see the module docstring); idempotent.

    Returns how many layers are guarded. The hooks cost two attribute reads per forward.
    """
    layers = _bnb_4bit_layers(model.modules())
    for layer in layers:
        if getattr(layer, _GUARD_HANDLES, None) is None:
            handles = (
                layer.register_forward_pre_hook(_before_forward),
                layer.register_state_dict_pre_hook(_before_state_dict),
            )
            setattr(layer, _GUARD_HANDLES, handles)
    return len(layers)


def unguard_4bit_layers(model: nn.Module) -> None:
    """Remove :func:`guard_4bit_layers`' hooks, leaving every layer in the standard layout."""
    for layer in _bnb_4bit_layers(model.modules()):
        handles = getattr(layer, _GUARD_HANDLES, None)
        restore_standard_layout_(layer)
        if handles is not None:
            for handle in handles:
                handle.remove()
            delattr(layer, _GUARD_HANDLES)

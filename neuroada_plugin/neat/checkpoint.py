"""How a saved NEAT adapter changes a base checkpoint, for the streaming merge (``neuroada-plugin merge``).

A NEAT adapter stores, per adapted linear layer ``M``: ``M.neat_A`` (``[r, out]``), ``M.neat_B``
(``[out, r]``) and, when ``depth > 0``, ``M.neat_E`` / ``M.neat_D`` (``[depth, r, r]``). The patch is
``W <- W + s * B @ P(W)`` with the arithmetic of :mod:`.functional`, which the in-memory layer uses
too, so both paths write bit-identical weights. Imports torch only (no PEFT, no Transformers).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import AdapterCheckpointError
from ..merge.rules import AdapterModule, BaseTensorInfo, TensorPatch
from .functional import ACTIVATIONS, merged_weight

__all__ = ["neat_checkpoint_rule"]

_REQUIRED = ("A", "B")
_OPTIONAL = ("E", "D")


def neat_checkpoint_rule(module: AdapterModule, base_tensors: Mapping[str, BaseTensorInfo]) -> list[TensorPatch]:
    """One :class:`TensorPatch` for the module's weight; validates everything that needs no base values."""
    where = module.where
    unknown = sorted(set(module.tensors) - {*_REQUIRED, *_OPTIONAL})
    if unknown:
        raise AdapterCheckpointError(
            f"{where}: unexpected NEAT tensor(s) {[module.keys[name] for name in unknown]}; a NEAT adapter holds "
            "'neat_A', 'neat_B' and, with depth > 0, 'neat_E' and 'neat_D' per layer."
        )
    missing = [name for name in _REQUIRED if name not in module.tensors]
    if missing:
        raise AdapterCheckpointError(
            f"{where} has no 'neat_{missing[0]}' entry (only {sorted(module.keys.values())}); the adapter file is "
            "incomplete. Re-save it with save_pretrained."
        )
    a, b = module.tensors["A"], module.tensors["B"]
    enc, dec = module.tensors.get("E"), module.tensors.get("D")
    depth = int(module.config.get("depth", 0) or 0)
    act = str(module.config.get("act_fn", "relu"))
    scaling = float(module.config.get("scaling", 1.0))
    if act not in ACTIVATIONS:
        raise AdapterCheckpointError(f"{where}: adapter_config.json has act_fn={act!r}, unknown to NEAT.")
    for name, tensor in (("A", a), ("B", b)):
        if tensor.dim() != 2 or not tensor.is_floating_point():
            raise AdapterCheckpointError(
                f"{where}: {module.keys[name]} must be a 2-D float tensor, got {tuple(tensor.shape)} {tensor.dtype}."
            )
    r, out = a.shape
    if tuple(b.shape) != (out, r):
        raise AdapterCheckpointError(
            f"{where}: {module.keys['B']} has shape {tuple(b.shape)}, expected {(out, r)} from neat_A {tuple(a.shape)}."
        )
    if (enc is None) != (dec is None) or (depth > 0 and enc is None):
        raise AdapterCheckpointError(
            f"{where}: depth={depth} in adapter_config.json but the file holds "
            f"{sorted(module.keys.values())}; a NEAT layer with depth > 0 needs both neat_E and neat_D."
        )
    for name, tensor in (("E", enc), ("D", dec)):
        if tensor is not None and tuple(tensor.shape) != (depth, r, r):
            raise AdapterCheckpointError(
                f"{where}: {module.keys[name]} has shape {tuple(tensor.shape)}, expected {(depth, r, r)} (depth, r, r)."
            )
    target = f"{module.module}.weight"

    def check(info: BaseTensorInfo) -> None:
        if info.dtype is None or not info.dtype.is_floating_point:
            raise AdapterCheckpointError(
                f"NEAT layer {module.module}: base tensor {info.name!r} in {info.file.name} has dtype "
                f"{info.dtype or 'unsupported'}; merging needs a floating-point (unquantized) weight."
            )
        if len(info.shape) != 2 or info.shape[0] != out:
            raise AdapterCheckpointError(
                f"NEAT layer {module.module}: base tensor {info.name!r} in {info.file.name} has shape "
                f"{list(info.shape)}, but the adapter expects {out} output features (neat_A {tuple(a.shape)})."
            )

    def apply(weight: torch.Tensor) -> torch.Tensor:
        try:
            return merged_weight(weight, weight, a, b, enc, dec, act, scaling)
        except ValueError as error:
            raise AdapterCheckpointError(
                f"NEAT layer {module.module} into {target!r}: {error} No output was written."
            ) from None

    return [TensorPatch(target=target, apply=apply, check=check, description=f"neat r={r} depth={depth}")]

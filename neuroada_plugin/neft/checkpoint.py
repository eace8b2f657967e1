"""How a saved NeFT adapter changes a base checkpoint, for the streaming merge (``neuroada-plugin merge``).

A NeFT adapter stores, per adapted linear layer ``M``: ``M.neft_delta`` and the selected neurons, in
``M.neft_rows`` (``delta: [n, in]``) or ``M.neft_cols`` (``delta: [out, n]``). The patch writes
``W[rows, :] + delta`` or ``W[:, cols] + delta`` with the arithmetic of :mod:`.functional`, which the
in-memory layer uses too, so both paths write bit-identical weights. Imports torch only.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import AdapterCheckpointError
from ..merge.rules import AdapterModule, BaseTensorInfo, TensorPatch, check_float_base, expect_tensors
from ..registry import get_method
from .functional import add_neurons, write_neurons

__all__ = ["neft_checkpoint_rule", "read_neft_module"]


def read_neft_module(module: AdapterModule) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(delta, indices, axis)`` of the module, with every check that needs no base values."""
    where = module.where
    expect_tensors(module, ("delta",), ("rows", "cols"), spec=get_method("neft"))
    axes = [axis for axis in ("rows", "cols") if axis in module.tensors]
    if len(axes) != 1:
        raise AdapterCheckpointError(
            f"{where}: a NeFT layer holds exactly one of neft_rows / neft_cols, found {sorted(module.keys.values())}."
        )
    axis = axes[0]
    delta, index = module.tensors["delta"], module.tensors[axis]
    if index.dtype.is_floating_point or index.dim() != 1 or index.unique().numel() != index.numel():
        raise AdapterCheckpointError(f"{where}: {module.keys[axis]} must be distinct integer indices (1-D).")
    if delta.dim() != 2 or not delta.is_floating_point():
        raise AdapterCheckpointError(f"{where}: {module.keys['delta']} must be a 2-D float tensor.")
    if delta.shape[0 if axis == "rows" else 1] != index.numel():
        raise AdapterCheckpointError(
            f"{where}: {module.keys['delta']} {tuple(delta.shape)} does not match {index.numel()} selected {axis}."
        )
    return delta, index.to(torch.int64), axis


def neft_checkpoint_rule(module: AdapterModule, base_tensors: Mapping[str, BaseTensorInfo]) -> list[TensorPatch]:
    """One :class:`TensorPatch` for the module's weight; validates everything that needs no base values."""
    delta, index, axis = read_neft_module(module)
    target = f"{module.module}.weight"

    def check(info: BaseTensorInfo) -> None:
        check_float_base(info, method="NeFT", module=module.module)
        size = info.shape[0] if axis == "rows" else info.shape[-1]
        other = info.shape[1] if axis == "rows" else info.shape[0]
        expected_other = delta.shape[1] if axis == "rows" else delta.shape[0]
        too_big = index.numel() and int(index.max()) >= size
        if len(info.shape) != 2 or too_big or other != expected_other:
            raise AdapterCheckpointError(
                f"NeFT layer {module.module}: base tensor {info.name!r} in {info.file.name} has shape "
                f"{list(info.shape)}, which the adapter's {tuple(delta.shape)} update of {axis} "
                f"{index.min().item() if index.numel() else '-'}..{index.max().item() if index.numel() else '-'} "
                "does not fit: the adapter was made for another model."
            )

    def apply(weight: torch.Tensor) -> torch.Tensor:
        what = f"NeFT layer {module.module} into {weight.dtype} tensor {target!r}"
        new, _ = add_neurons(weight, delta, index, axis, what=what)
        write_neurons(weight, new, index, axis)
        return weight

    return [TensorPatch(target=target, apply=apply, check=check, description=f"neft {index.numel()} {axis}")]

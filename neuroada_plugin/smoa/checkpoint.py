"""How a saved SMoA adapter changes a base checkpoint, for the streaming merge (``neuroada-plugin merge``).

An SMoA adapter stores, per adapted linear layer ``M``: ``M.smoa_A`` and ``M.smoa_B`` (every block's
factors, flat) and the orderings ``M.smoa_rows`` / ``M.smoa_cols`` computed when it was created. The
patch is ``W <- W + dW(W)`` with the arithmetic of :mod:`.functional` and the saved orderings (never
recomputed), which the in-memory layer uses too, so both paths write bit-identical weights. Imports
torch only (no PEFT, no Transformers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import AdapterCheckpointError
from ..merge.rules import AdapterModule, BaseTensorInfo, TensorPatch, check_float_base, expect_tensors
from ..registry import get_method
from .functional import BlockLayout, block_ranks, check_order, merged_weight

__all__ = ["SmoaModuleTensors", "read_smoa_module", "smoa_checkpoint_rule"]

_REQUIRED = ("A", "B", "rows", "cols")


@dataclass(frozen=True)
class SmoaModuleTensors:
    """One adapted layer's SMoA tensors and settings, read from a saved adapter and checked."""

    a: torch.Tensor
    b: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    layout: BlockLayout
    scaling: float

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows.shape[0], self.cols.shape[0]


def _int(config: Mapping, key: str, default: int, where: str) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdapterCheckpointError(f"{where}: adapter_config.json has {key}={value!r}; a positive integer is needed.")
    return value


def read_smoa_module(module: AdapterModule) -> SmoaModuleTensors:
    """The module's SMoA tensors, with every check that needs no base values (names, shapes, orderings, config)."""
    where = module.where
    expect_tensors(module, _REQUIRED, spec=get_method("smoa"))
    config = module.config
    r, num_blocks = _int(config, "r", 8, where), _int(config, "num_blocks", 2, where)
    ranks = block_ranks(r, num_blocks, config.get("branch_ranks"))
    if len(ranks) != num_blocks or sum(ranks) != r or min(ranks) < 0:
        raise AdapterCheckpointError(
            f"{where}: adapter_config.json has branch_ranks={ranks}, which is not {num_blocks} ranks summing to r={r}."
        )
    alpha = config.get("alpha", 8.0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AdapterCheckpointError(f"{where}: adapter_config.json has alpha={alpha!r}; a finite number is needed.")
    if any(isinstance(v, bool) or not isinstance(v, int) for v in ranks):
        raise AdapterCheckpointError(f"{where}: adapter_config.json has branch_ranks={ranks}; integers are needed.")
    rows, cols = module.tensors["rows"], module.tensors["cols"]
    for name, order in (("rows", rows), ("cols", cols)):
        if order.dim() != 1:
            raise AdapterCheckpointError(f"{where}: {module.keys[name]} must be 1-D, got shape {tuple(order.shape)}.")
        problem = check_order(order, order.shape[0])
        if problem is not None:
            raise AdapterCheckpointError(f"{where}: {module.keys[name]} has {problem}.")
    layout = BlockLayout.of(rows.shape[0], cols.shape[0], ranks)
    for name, expected in (("A", layout.a_numel), ("B", layout.b_numel)):
        tensor = module.tensors[name]
        if tensor.dim() != 1 or tensor.numel() != expected or not tensor.is_floating_point():
            raise AdapterCheckpointError(
                f"{where}: {module.keys[name]} is a {tuple(tensor.shape)} {tensor.dtype} tensor; ranks {ranks} on a "
                f"{[rows.shape[0], cols.shape[0]]} weight need a flat float tensor of {expected} entries."
            )
    return SmoaModuleTensors(
        module.tensors["A"], module.tensors["B"], rows.to(torch.int64), cols.to(torch.int64), layout, float(alpha) / r
    )


def check_base_weight(module: AdapterModule, tensors: SmoaModuleTensors, info: BaseTensorInfo) -> None:
    """Refuse a base weight SMoA cannot modulate: not floating point (quantized), or not of the orderings' shape."""
    check_float_base(info, method="SMoA", module=module.module)
    if tuple(info.shape) != tensors.shape:
        raise AdapterCheckpointError(
            f"SMoA layer {module.module}: base tensor {info.name!r} in {info.file.name} has shape {list(info.shape)}, "
            f"but the adapter's orderings are for a {list(tensors.shape)} weight (smoa_rows, smoa_cols). The adapter "
            "was made for another model."
        )


def smoa_checkpoint_rule(module: AdapterModule, base_tensors: Mapping[str, BaseTensorInfo]) -> list[TensorPatch]:
    """One :class:`TensorPatch` for the module's weight; validates everything that needs no base values."""
    t = read_smoa_module(module)
    target = f"{module.module}.weight"

    def apply(weight: torch.Tensor) -> torch.Tensor:
        what = f"SMoA layer {module.module} into {weight.dtype} tensor {target!r}"
        return merged_weight(weight, weight, t.a, t.b, t.rows, t.cols, t.layout, t.scaling, what=what)

    return [
        TensorPatch(
            target=target,
            apply=apply,
            check=lambda info: check_base_weight(module, t, info),
            description=f"smoa r={sum(t.layout.ranks)} blocks={len(t.layout.ranks)}",
        )
    ]

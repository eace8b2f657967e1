"""How a saved NEAT adapter changes a base checkpoint, for the streaming merge (``neuroada-plugin merge``).

A NEAT adapter stores, per adapted linear layer ``M``: ``M.neat_A`` (``[r, out]``), ``M.neat_B``
(``[out, r]``) and, when ``depth > 0``, ``M.neat_E`` / ``M.neat_D`` (``[depth, r, r]``). The patch is
``W <- W + s * B @ P(W)`` with the arithmetic of :mod:`.functional`, which the in-memory layer uses
too, so both paths write bit-identical weights. An adapter trained on a bitsandbytes base computes
``P`` from the weight it learned against, ``W <- W + s * B @ P(deq(quant(W)))``, the original
re-quantized with the settings recorded in ``adapter_config.json`` (``base_quantization``). Imports torch only (no PEFT, no Transformers).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import AdapterCheckpointError
from ..merge.rules import (
    AdapterModule,
    BaseTensorInfo,
    TensorPatch,
    check_float_base,
    check_reproducible,
    expect_tensors,
    trained_against,
)
from ..registry import get_method
from .functional import ACTIVATIONS, merged_weight

__all__ = ["NeatModuleTensors", "check_base_weight", "neat_checkpoint_rule", "read_neat_module"]

_REQUIRED = ("A", "B")
_OPTIONAL = ("E", "D")


@dataclass(frozen=True)
class NeatModuleTensors:
    """One adapted layer's NEAT tensors and settings, read from a saved adapter and checked."""

    a: torch.Tensor
    b: torch.Tensor
    encoders: torch.Tensor | None
    decoders: torch.Tensor | None
    act: str
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def out_features(self) -> int:
        return self.a.shape[1]

    @property
    def depth(self) -> int:
        return 0 if self.encoders is None else self.encoders.shape[0]


def read_neat_module(module: AdapterModule) -> NeatModuleTensors:
    """The module's NEAT tensors, with every check that needs no base values (names, shapes, dtypes, config)."""
    where = module.where
    expect_tensors(module, _REQUIRED, _OPTIONAL, spec=get_method("neat"))
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
    return NeatModuleTensors(a, b, enc, dec, act, scaling)


def check_base_weight(module: AdapterModule, tensors: NeatModuleTensors, info: BaseTensorInfo) -> None:
    """Refuse a base weight NEAT cannot read: not floating point (quantized), or not ``[out, *]``; and a layer
    trained on a quantized base when bitsandbytes is missing (its update needs the re-quantized weight)."""
    check_float_base(info, method="NEAT", module=module.module)
    check_reproducible(module, method="NEAT")
    if len(info.shape) != 2 or info.shape[0] != tensors.out_features:
        raise AdapterCheckpointError(
            f"NEAT layer {module.module}: base tensor {info.name!r} in {info.file.name} has shape "
            f"{list(info.shape)}, but the adapter expects {tensors.out_features} output features "
            f"(neat_A {tuple(tensors.a.shape)})."
        )


def neat_checkpoint_rule(module: AdapterModule, base_tensors: Mapping[str, BaseTensorInfo]) -> list[TensorPatch]:
    """One :class:`TensorPatch` for the module's weight; validates everything that needs no base values."""
    t = read_neat_module(module)
    target = f"{module.module}.weight"

    def apply(weight: torch.Tensor) -> torch.Tensor:
        what = f"NEAT layer {module.module} into {weight.dtype} tensor {target!r}"
        # dW is a function of W0: of the dequantized weight when the adapter was trained on a 4-bit/8-bit base.
        original = trained_against(module, weight, patch, method="NEAT")
        return merged_weight(weight, original, t.a, t.b, t.encoders, t.decoders, t.act, t.scaling, what=what)

    patch = TensorPatch(
        target=target,
        apply=apply,
        check=lambda info: check_base_weight(module, t, info),
        description=f"neat r={t.rank} depth={t.depth}",
    )
    return [patch]

"""How a saved NeuroAda adapter changes a base checkpoint, for the streaming merge (``neuroada-plugin merge``).

A NeuroAda adapter stores, per adapted linear layer ``M``, ``M.neuroada_theta`` (float
``[out, k]``) and ``M.neuroada_indices`` (integer ``[out, k]``). Merging changes exactly
``out * k`` entries of ``M.weight``: ``W[i, idx[i, j]] = merged_entries(W[i, idx[i, j]], theta[i, j])``.
Validation and that arithmetic come from :mod:`.validation`, which the in-memory layer uses too,
so both paths accept the same files and write bit-identical weights in any dtype.

The engine groups the file's tensors by module and checks them (one adapter, finite values)
before calling the rule; this module imports torch only (no PEFT, no Transformers).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import AdapterCheckpointError
from ..merge.rules import AdapterModule, BaseTensorInfo, TensorPatch, check_float_base, expect_tensors
from ..registry import get_method
from .validation import check_fits, check_indices, check_theta, index_span, merge_values, put_entries_

__all__ = ["neuroada_checkpoint_rule"]

_PARAMS = ("theta", "indices")


def neuroada_checkpoint_rule(module: AdapterModule, base_tensors: Mapping[str, BaseTensorInfo]) -> list[TensorPatch]:
    """One :class:`TensorPatch` for the module's weight; validates everything that needs no base values."""
    where = module.where
    expect_tensors(module, _PARAMS, spec=get_method("neuroada"))
    indices = check_indices(module.tensors["indices"], where=where, key=module.keys["indices"])
    theta = module.tensors["theta"]
    check_theta(theta, where=where, key=module.keys["theta"], expected=tuple(indices.shape))
    config_k = module.config.get("top_k")
    if config_k is not None and theta.shape[1] != config_k:
        raise AdapterCheckpointError(
            f"{where}: theta has k={theta.shape[1]} connections per neuron but adapter_config.json says "
            f"top_k={config_k}."
        )
    return [_patch(module.module, theta, indices)]


def _patch(module: str, theta: torch.Tensor, indices: torch.Tensor) -> TensorPatch:
    target = f"{module}.weight"
    span = index_span(indices)

    def check(info: BaseTensorInfo) -> None:
        check_float_base(info, method="NeuroAda", module=module)
        check_fits(
            tuple(theta.shape),
            span,
            info.shape,
            where=f"layer {module}",
            weight=f"base tensor {info.name!r} in {info.file.name}",
        )

    def apply(weight: torch.Tensor) -> torch.Tensor:
        updated = merge_values(
            weight.gather(1, indices),
            theta,
            what=f"NeuroAda layer {module} into {weight.dtype} tensor {target!r}",
            outcome="No output was written.",
        )
        return put_entries_(weight, indices, updated)

    return TensorPatch(target=target, apply=apply, check=check, description=f"neuroada k={theta.shape[1]}")

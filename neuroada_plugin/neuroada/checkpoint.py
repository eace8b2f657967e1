"""How a saved NeuroAda adapter changes a base checkpoint, for the streaming merge (``neuroada-merge``).

A NeuroAda adapter stores, per adapted linear layer ``M``, ``M.neuroada_theta`` (float
``[out, k]``) and ``M.neuroada_indices`` (int64 ``[out, k]``). Merging changes exactly
``out * k`` entries of ``M.weight``: ``W[i, idx[i, j]] = merged_entries(W[i, idx[i, j]], theta[i, j])``,
the same function the in-memory ``merge()`` uses, so both give bit-identical weights in any dtype.

The rule registers itself with :mod:`neuroada_plugin.merge.registry` on import; the engine
imports this module when it meets ``"peft_type": "NEUROADA"``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..errors import AdapterCheckpointError, MergeError
from ..merge.registry import AdapterCheckpoint, BaseTensorInfo, TensorPatch, register_checkpoint_rule
from .functional import merged_entries

__all__ = ["neuroada_checkpoint_rule"]

# "<module>.neuroada_theta" as PEFT saves it; "<module>.neuroada_theta.<adapter name>" as a raw
# state_dict of the PeftModel holds it (accepted so hand-exported adapters merge too).
_KEY = re.compile(r"(?P<module>.+)\.neuroada_(?P<kind>theta|indices)(?:\.(?P<adapter>[^.]+))?")


def neuroada_checkpoint_rule(
    adapter: AdapterCheckpoint, base_tensors: Mapping[str, BaseTensorInfo]
) -> list[TensorPatch]:
    """One :class:`TensorPatch` per adapted layer; validates everything that needs no base values."""
    found: dict[str, dict[str, str]] = {}
    for key in adapter.tensors:
        match = _KEY.fullmatch(key)
        if match is None:
            continue  # not ours: the engine reports keys that no rule consumed
        slot = found.setdefault(match["module"], {})
        if match["kind"] in slot:
            raise AdapterCheckpointError(
                f"{adapter.weights_file}: layer {match['module']} has two '{match['kind']}' entries "
                f"({slot[match['kind']]!r} and {key!r}): the file holds several adapters; save one adapter at a time."
            )
        slot[match["kind"]] = key
    if not found:
        raise AdapterCheckpointError(
            f"{adapter.weights_file}: adapter_config.json says NEUROADA, but the file has no "
            "'*.neuroada_theta' / '*.neuroada_indices' tensors."
        )
    config_k = adapter.config.get("top_k")
    patches = []
    for module in sorted(found):
        keys = found[module]
        missing = {"theta", "indices"} - set(keys)
        if missing:
            raise AdapterCheckpointError(
                f"{adapter.weights_file}: layer {module} has no 'neuroada_{missing.pop()}' entry (only "
                f"{sorted(keys.values())}); the adapter file is incomplete. Re-save it with save_pretrained."
            )
        theta, indices = adapter.tensors[keys["theta"]], adapter.tensors[keys["indices"]]
        _check_adapter_tensors(module, keys, theta, indices, config_k, adapter)
        patches.append(_patch(module, keys, theta, indices.to(torch.int64)))
    return patches


def _check_adapter_tensors(module, keys, theta, indices, config_k, adapter) -> None:
    where = f"{adapter.weights_file}: layer {module}"
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise AdapterCheckpointError(
            f"{where}: {keys['indices']!r} has dtype {indices.dtype}; connection indices must be integers (the file "
            "was corrupted or rewritten by a tool that cast every tensor to float)."
        )
    if not theta.is_floating_point():
        raise AdapterCheckpointError(f"{where}: {keys['theta']!r} has dtype {theta.dtype}; theta must be float.")
    if theta.dim() != 2 or indices.shape != theta.shape:
        raise AdapterCheckpointError(
            f"{where}: theta has shape {list(theta.shape)} and indices {list(indices.shape)}; both must be the same "
            "[out, k] shape."
        )
    if config_k is not None and theta.shape[1] != config_k:
        raise AdapterCheckpointError(
            f"{where}: theta has k={theta.shape[1]} connections per neuron but adapter_config.json says "
            f"top_k={config_k}."
        )
    if indices.numel():
        if int(indices.min()) < 0:
            raise AdapterCheckpointError(f"{where}: negative connection index {int(indices.min())}.")
        ordered = indices.sort(dim=1).values
        if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            row = int((ordered[:, 1:] == ordered[:, :-1]).any(dim=1).nonzero()[0])
            raise AdapterCheckpointError(
                f"{where}: row {row} lists the same input connection twice ({indices[row].tolist()}); NeuroAda "
                "selects distinct connections per neuron, so the file is corrupted."
            )


def _patch(module: str, keys: dict[str, str], theta: torch.Tensor, indices: torch.Tensor) -> TensorPatch:
    target = f"{module}.weight"
    out_features, k = theta.shape
    max_index = int(indices.max()) if indices.numel() else -1

    def check(info: BaseTensorInfo) -> None:
        if info.dtype is None or not info.dtype.is_floating_point:
            raise AdapterCheckpointError(
                f"NeuroAda layer {module}: base tensor {info.name!r} in {info.file.name} has dtype "
                f"{info.dtype or 'unsupported'}; merging needs a floating-point (unquantized) weight."
            )
        if len(info.shape) != 2 or info.shape[0] != out_features or max_index >= info.shape[1]:
            raise AdapterCheckpointError(
                f"NeuroAda adapter does not fit the base model: layer {module} has theta/indices of shape "
                f"[{out_features}, {k}] (largest input index {max_index}), but base tensor {info.name!r} in "
                f"{info.file.name} has shape {list(info.shape)}. The adapter was trained on a different base model."
            )

    def apply(weight: torch.Tensor) -> torch.Tensor:
        original = weight.gather(1, indices)
        updated = merged_entries(original, theta)
        if not torch.isfinite(updated).all():
            bad = int((~torch.isfinite(updated)).sum())
            raise MergeError(
                f"Merging NeuroAda layer {module} would write {bad} non-finite value(s) into the {weight.dtype} "
                f"tensor {target!r} (theta has NaN/inf or overflows the dtype). No output was written."
            )
        return weight.scatter_(1, indices, updated)

    return TensorPatch(
        target=target, sources=(keys["theta"], keys["indices"]), apply=apply, check=check, description=f"neuroada k={k}"
    )


register_checkpoint_rule("NEUROADA", neuroada_checkpoint_rule)

"""NeFT's update rebuilt from a saved adapter's tensors alone, in float64: the reference of the end-to-end tests.

NeFT (Xu et al., COLING 2025) trains whole neurons: rows of ``up_proj`` (output units) and columns of
``down_proj`` (input units). A saved adapter holds, per adapted layer ``M``, ``M.neft_delta`` and the
selected neurons in ``M.neft_rows`` (``delta: [n, in]``) or ``M.neft_cols`` (``delta: [out, n]``), so
``dW = S.T @ delta`` or ``dW = delta @ S`` with ``S = eye[index]`` the one-hot selection matrix (written
here from the formula and the saved files only: nothing of ``neuroada_plugin`` is imported, no scatter is
shared with the implementation). Also here: the data-free ``selection="magnitude"`` rule (largest L2 norm
over all candidate neurons, one global budget) computed from a base checkpoint's weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

F64 = torch.float64
AXES = ("rows", "cols")


def adapter_tensors(adapter_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Base weight key -> {"delta", "rows" or "cols", "fingerprint"}, read straight from adapter_model.safetensors."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(Path(adapter_dir) / "adapter_model.safetensors").items():
        module, _, name = key.removeprefix("base_model.model.").rpartition(".neft_")
        out.setdefault(f"{module}.weight", {})[name] = tensor
    return out


def neurons(tensors: dict[str, torch.Tensor]) -> tuple[str, torch.Tensor]:
    """``(axis, indices)`` of one layer's saved tensors: exactly one of ``rows`` / ``cols``."""
    (axis,) = [axis for axis in AXES if axis in tensors]
    return axis, tensors[axis]


def dense_delta(shape: tuple[int, int], tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float64 ``dW [out, in]`` of one layer: ``delta`` in its selected rows or columns, zero elsewhere."""
    axis, index = neurons(tensors)
    delta = tensors["delta"].to(F64)
    if axis == "rows":
        select = torch.eye(shape[0], dtype=F64)[index]  # [n, out]
        return select.T @ delta
    select = torch.eye(shape[1], dtype=F64)[index]  # [n, in]
    return delta @ select


def neuron_mask(shape: tuple[int, int], axis: str, index: torch.Tensor | list[int]) -> torch.Tensor:
    """Boolean ``[out, in]`` mask of the selected rows (``axis="rows"``) or columns."""
    mask = torch.zeros(shape, dtype=torch.bool)
    index = torch.as_tensor(index, dtype=torch.int64)
    if axis == "rows":
        mask[index] = True
    else:
        mask[:, index] = True
    return mask


def dense_state(base_state: dict[str, torch.Tensor], adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The base state in float64 with every adapted weight replaced by ``W0 + dW``."""
    state = {key: value.to(F64) for key, value in base_state.items()}
    for key, tensors in adapter_tensors(adapter_dir).items():
        state[key] = state[key] + dense_delta(tuple(base_state[key].shape), tensors)
    return state


def merged_float(base: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """``W0 + dW`` rounded once into ``W0``'s dtype: what an exact merge writes (the float64 sum of two float32
    values rounds to the float32 sum; entries outside the selected neurons stay ``W0`` exactly)."""
    return (base.to(F64) + dense_delta(tuple(base.shape), tensors)).to(base.dtype)


def dense_model(model_dir: Path, adapter_dir: Path):
    """The float64 model (``transformers``, no PEFT) with ``W0 + dW`` written into its weights, in eval mode."""
    from transformers import AutoModelForCausalLM

    base_state = load_file(Path(model_dir) / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=F64)
    missing, unexpected = model.load_state_dict(dense_state(base_state, adapter_dir), strict=False)
    assert not unexpected and all("rotary" in key for key in missing), (missing, unexpected)
    return model.eval()


def magnitude_selection(
    base_state: dict[str, torch.Tensor],
    *,
    num_neurons: int | None = None,
    neuron_share: float | None = None,
    targets: tuple[str, ...] = ("up_proj", "down_proj"),
    columns: tuple[str, ...] = ("down_proj",),
) -> dict[str, tuple[str, list[int]]]:
    """The largest-norm neurons over every candidate layer under one budget: module -> (axis, ascending indices).

    The budget is a neuron count, or a share of all parameters (``int(share * total)`` entries, neurons taken in
    descending norm while they fit). Layers with no selected neuron are left out.
    """
    total = sum(tensor.numel() for tensor in base_state.values())
    scored = []  # (norm, module, axis, index, entries of one neuron)
    for key, weight in base_state.items():
        module = key.removesuffix(".weight")
        if not key.endswith(".weight") or not module.endswith(tuple(f".{t}" for t in targets)):
            continue
        axis = "cols" if module.endswith(tuple(f".{c}" for c in columns)) else "rows"
        per_neuron = weight.to(F64) if axis == "rows" else weight.to(F64).T
        scored += [(float(norm), module, axis, i, per_neuron.shape[1]) for i, norm in enumerate(per_neuron.norm(dim=1))]
    scored.sort(key=lambda item: -item[0])
    budget = None if neuron_share is None else int(neuron_share * total)
    chosen: dict[str, tuple[str, list[int]]] = {}
    used = 0
    for count, (_, module, axis, index, size) in enumerate(scored):
        if (num_neurons is not None and count == num_neurons) or (budget is not None and used + size > budget):
            break
        chosen.setdefault(module, (axis, []))[1].append(index)
        used += size
    return {module: (axis, sorted(indices)) for module, (axis, indices) in chosen.items()}


def adapter_config(adapter_dir: Path) -> dict:
    return json.loads((Path(adapter_dir) / "adapter_config.json").read_text())

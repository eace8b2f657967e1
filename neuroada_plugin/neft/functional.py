"""NeFT's math, shared by the tuner, the selection command and the streaming-merge rule (torch only, no PEFT).

A *neuron* of a linear layer ``W: [out, in]`` is one row (``axis="rows"``: output unit ``i``, the paper's
"in" neuron of ``up_proj``) or one column (``axis="cols"``: input unit ``j``, its "out" neuron of
``down_proj``). An adapter trains, per layer, the values of its selected neurons only: ``delta`` is
``[n, in]`` for rows and ``[out, n]`` for columns, zero at the start, and

* forward: ``y[..., rows] += x @ delta.T`` or ``y += x[..., cols] @ delta.T``;
* merge: ``W[rows, :] += delta`` or ``W[:, cols] += delta`` (computed in float32, written in ``W``'s dtype).

Selection picks neurons over all candidate layers under one global budget (no per-layer quota), by a
score per neuron: the paper's cosine similarity between the original and a briefly fine-tuned weight
(lowest first), or the data-free ablations (largest norm, or seeded random).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..kit.merge_checks import checked_finite

__all__ = [
    "AXES",
    "Candidate",
    "add_neurons",
    "cosine_scores",
    "delta_weight",
    "global_selection",
    "magnitude_scores",
    "neuron_output",
    "random_scores",
    "resolve_budget",
]

AXES = ("rows", "cols")


def neuron_output(x: torch.Tensor, delta: torch.Tensor, index: torch.Tensor, axis: str, out_features: int) -> torch.Tensor:
    """What the selected neurons add to a layer's output (``[..., out]``, in ``delta``'s dtype)."""
    x = x.to(delta.dtype)
    if axis == "rows":
        update = x @ delta.T  # [..., n]
        return update.new_zeros(*update.shape[:-1], out_features).index_add(-1, index, update)
    return x.index_select(-1, index) @ delta.T


def delta_weight(shape: tuple[int, int], delta: torch.Tensor, index: torch.Tensor, axis: str) -> torch.Tensor:
    """The dense update (``[out, in]``, float32): ``delta`` in the selected rows or columns, zero elsewhere."""
    dense = torch.zeros(shape, dtype=torch.float32, device=delta.device)
    if axis == "rows":
        dense[index.to(delta.device)] = delta.detach().float()
    else:
        dense[:, index.to(delta.device)] = delta.detach().float()
    return dense


def add_neurons(
    weight: torch.Tensor, delta: torch.Tensor, index: torch.Tensor, axis: str, *, what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(new values, old values)`` of the selected rows/columns of ``weight`` after adding ``delta``; writes nothing.

    New values are ``old + delta`` in float32 (float64 for a float64 weight), cast to ``weight``'s dtype; :class:`MergeError` names ``what``
    if any is NaN/inf. The in-memory merge and the streaming rule both write these values.
    """
    index = index.to(weight.device)
    old = weight[index] if axis == "rows" else weight[:, index]
    compute = torch.promote_types(weight.dtype, torch.float32)  # float32, or float64 for a float64 weight
    new = (old.to(compute) + delta.detach().to(weight.device, compute)).to(weight.dtype)
    return checked_finite(new, what=what), old


def write_neurons(weight: torch.Tensor, values: torch.Tensor, index: torch.Tensor, axis: str) -> None:
    """Write ``values`` into the selected rows/columns of ``weight`` in place."""
    index = index.to(weight.device)
    if axis == "rows":
        weight[index] = values
    else:
        weight[:, index] = values


# ------------------------------------------------------------------------------------------------ selection


@dataclass(frozen=True)
class Candidate:
    """One layer whose neurons may be selected: its name, axis, and the parameters one neuron holds."""

    module: str
    axis: str
    shape: tuple[int, int]

    @property
    def count(self) -> int:
        """How many neurons the layer has (rows or columns)."""
        return self.shape[0] if self.axis == "rows" else self.shape[1]

    @property
    def neuron_size(self) -> int:
        """Entries of one neuron (a row holds ``in`` entries, a column ``out``)."""
        return self.shape[1] if self.axis == "rows" else self.shape[0]


def _per_neuron(weight: torch.Tensor, axis: str) -> torch.Tensor:
    """``weight`` as ``[neurons, entries]`` (rows as they are, columns transposed), float64."""
    matrix = weight.detach().to(torch.float64)
    return matrix if axis == "rows" else matrix.T


def cosine_scores(original: torch.Tensor, trained: torch.Tensor, axis: str) -> torch.Tensor:
    """Cosine similarity of each neuron before and after the reference fine-tuning (float64; low = moved most).

    A neuron that is zero before or after has similarity 1 (it cannot have turned).
    """
    a, b = _per_neuron(original, axis), _per_neuron(trained.to(original.device), axis)
    norms = a.norm(dim=1) * b.norm(dim=1)
    dots = (a * b).sum(dim=1)
    return torch.where(norms > 0, dots / norms.clamp_min(torch.finfo(torch.float64).tiny), 1.0)


def magnitude_scores(weight: torch.Tensor, axis: str) -> torch.Tensor:
    """Minus the L2 norm of each neuron (float64): lowest score = largest norm, so selection takes the largest."""
    return -_per_neuron(weight, axis).norm(dim=1)


def random_scores(count: int, seed: int, module: str) -> torch.Tensor:
    """Seeded uniform scores for ``count`` neurons, different per module name, the same on every run and device."""
    salt = sum((i + 1) * ord(c) for i, c in enumerate(module)) % (2**31)
    generator = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + salt)
    return torch.rand(count, generator=generator, dtype=torch.float64)


def resolve_budget(
    candidates: list[Candidate],
    *,
    num_neurons: int | None,
    neuron_share: float | None,
    total_parameters: int,
) -> tuple[int | None, int | None]:
    """``(neurons, parameters)``: the budget as a neuron count, or as a parameter count (share x all parameters).

    Raises ``ValueError`` for a budget of zero or one larger than the candidate pool.
    """
    pool = sum(c.count for c in candidates)
    pool_params = sum(c.count * c.neuron_size for c in candidates)
    if (num_neurons is None) == (neuron_share is None):
        raise ValueError("Give the NeFT budget as exactly one of num_neurons (a count) or neuron_share (a share).")
    if num_neurons is not None:
        if num_neurons < 1 or num_neurons > pool:
            raise ValueError(
                f"NeFT num_neurons={num_neurons} is outside 1..{pool}, the candidate pool ({len(candidates)} layers)."
            )
        return num_neurons, None
    assert neuron_share is not None
    budget = int(neuron_share * total_parameters)
    smallest = min((c.neuron_size for c in candidates), default=0)
    if not 0 < neuron_share < 1 or budget < smallest or budget > pool_params:
        raise ValueError(
            f"NeFT neuron_share={neuron_share} of {total_parameters:,} parameters is {budget:,} parameters; it must "
            f"hold at least one neuron ({smallest:,}) and at most the candidate pool ({pool_params:,} parameters in "
            f"{pool:,} neurons)."
        )
    return None, budget


def global_selection(
    candidates: list[Candidate],
    scores: Mapping[str, torch.Tensor],
    *,
    neurons: int | None = None,
    parameters: int | None = None,
) -> dict[str, torch.Tensor]:
    """The lowest-scoring neurons over all candidates under one budget (no per-layer quota).

    Exactly ``neurons`` neurons, or as many as fit in ``parameters`` entries, taken in ascending score;
    ties keep candidate order, then index order. Returns ``{module: ascending int64 indices}`` with an
    entry for every candidate (possibly empty).
    """
    all_scores = torch.cat([scores[c.module].to(torch.float64).cpu() for c in candidates])
    owner = torch.cat([torch.full((c.count,), i, dtype=torch.int64) for i, c in enumerate(candidates)])
    local = torch.cat([torch.arange(c.count, dtype=torch.int64) for c in candidates])
    order = torch.sort(all_scores, stable=True).indices
    if neurons is not None:
        taken = order[:neurons]
    else:
        sizes = torch.tensor([candidates[i].neuron_size for i in owner[order].tolist()], dtype=torch.int64)
        taken = order[: int((sizes.cumsum(0) <= parameters).sum())]
    chosen = {c.module: [] for c in candidates}
    for position in taken.tolist():
        chosen[candidates[owner[position]].module].append(local[position].item())
    return {module: torch.tensor(sorted(indices), dtype=torch.int64) for module, indices in chosen.items()}

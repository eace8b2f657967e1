"""Per-output-neuron connection selection: which ``k`` inputs of every row are trained.

Selection runs once, from the frozen weight, and never needs data. It is exactly
reproducible: ties are broken towards the lower input index, every device gives the same
indices, and the result is returned with columns in ascending order per row (the canonical
form stored in checkpoints).
"""

from __future__ import annotations

import zlib

import torch

# Rows are processed in blocks so that the temporaries stay near this many elements
# (a sort of a 4096 x 11008 weight at once would need ~0.4 GB of int64 indices).
_BLOCK_ELEMENTS = 1 << 24


def _rows_per_block(in_features: int) -> int:
    return max(1, _BLOCK_ELEMENTS // max(1, in_features))


@torch.no_grad()
def select_connections(
    weight: torch.Tensor,
    k: int,
    selection: str = "magnitude",
    *,
    seed: int = 0,
    salt: str = "",
) -> torch.Tensor:
    """Return ``int64`` indices of shape ``[out, k]``: the trained inputs of every output row.

    Args:
        weight: The frozen weight ``[out, in]`` (any float dtype and device).
        k: Connections per row, ``1 <= k <= in``.
        selection: ``"magnitude"`` (largest ``|W|``), ``"smallest"`` (smallest ``|W|``) or
            ``"random"`` (uniform without replacement, from ``seed`` and ``salt``).
        seed: Seed of the random selection.
        salt: Mixed into the random seed (the module name) so that layers of equal shape
            get different patterns.
    """
    if weight.dim() != 2:
        raise ValueError(f"selection needs a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if not 1 <= k <= in_features:
        raise ValueError(f"top_k={k} must be between 1 and in_features={in_features}")

    if selection == "random":
        return _random_rows(out_features, in_features, k, seed, salt).to(weight.device)
    if selection not in ("magnitude", "smallest"):
        raise ValueError(f"unknown selection {selection!r}")

    descending = selection == "magnitude"
    result = torch.empty(out_features, k, dtype=torch.int64, device=weight.device)
    step = _rows_per_block(in_features)
    for start in range(0, out_features, step):
        block = weight[start : start + step].abs()
        result[start : start + step] = _top_k_lowest_index_ties(block, k, descending)
    return result


def _top_k_lowest_index_ties(magnitudes: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Ascending column indices of each row's k largest (or smallest) values, ties to the lower index.

    ``topk`` finds each row's k-th value (O(in) per row, not a full sort); every entry strictly
    beyond it is taken, and entries equal to it fill the remaining places from the lowest index
    up. That is exactly what a stable sort would pick. Rows with NaN take the stable-sort path.
    """
    rows, _ = magnitudes.shape
    kth = magnitudes.topk(k, dim=1, largest=largest, sorted=True).values[:, -1:]
    beyond = magnitudes > kth if largest else magnitudes < kth
    equal = magnitudes == kth
    missing = k - beyond.sum(dim=1, keepdim=True)
    chosen = beyond
    tied_rows = (equal.sum(dim=1, keepdim=True) > missing).squeeze(1)
    if bool(tied_rows.any()):
        # Only rows where more entries equal the k-th value than places are left need a rank.
        rank = equal[tied_rows].to(torch.int32).cumsum(dim=1, dtype=torch.int32)
        chosen = beyond.clone()
        chosen[tied_rows] |= equal[tied_rows] & (rank <= missing[tied_rows])
        chosen[~tied_rows] |= equal[~tied_rows]
    else:
        chosen |= equal
    # NaN ranks above every number in a sort but equals nothing here: such rows take the sort path.
    valid = (chosen.sum(dim=1) == k) & ~magnitudes.isnan().any(dim=1)
    if bool(valid.all()):
        return chosen.nonzero()[:, 1].view(rows, k)  # row-major: ascending columns per row
    columns = torch.empty(rows, k, dtype=torch.int64, device=magnitudes.device)
    columns[valid] = chosen[valid].nonzero()[:, 1].view(-1, k)
    order = torch.sort(magnitudes[~valid], dim=1, descending=largest, stable=True).indices[:, :k]
    columns[~valid] = order.sort(dim=1).values
    return columns


def _random_rows(out_features: int, in_features: int, k: int, seed: int, salt: str) -> torch.Tensor:
    """Uniform k-subsets per row, generated on the CPU so every device gets the same pattern."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed((seed * 1_000_003 + zlib.crc32(salt.encode())) % (2**63))
    result = torch.empty(out_features, k, dtype=torch.int64)
    step = _rows_per_block(in_features)
    for start in range(0, out_features, step):
        rows = min(step, out_features - start)
        keys = torch.rand(rows, in_features, generator=generator)
        order = torch.sort(keys, dim=1, stable=True).indices[:, :k]
        result[start : start + rows] = order.sort(dim=1).values
    return result

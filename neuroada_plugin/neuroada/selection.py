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
        # A stable sort ranks equal magnitudes by input index, the same on every device.
        order = torch.sort(block, dim=1, descending=descending, stable=True).indices[:, :k]
        result[start : start + step] = order.sort(dim=1).values
    return result


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

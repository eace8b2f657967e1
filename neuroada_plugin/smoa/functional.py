"""SMoA's math, shared by the tuner layer and the streaming-merge rule (torch only, no PEFT).

Notation (PyTorch layout): ``W0`` is the frozen weight ``[out, in]``. ``rows`` and ``cols`` are
permutations of ``range(out)`` and ``range(in)`` (the spectral orderings); cut into ``K`` contiguous
groups (:func:`split_sizes`), they give the blocks ``R_k x C_k``. Block ``k`` has ``A_k: [r_k, |C_k|]``
and ``B_k: [|R_k|, r_k]``, stored for all blocks in one flat tensor each (:class:`BlockLayout`), and
adds ``dW[R_k, C_k] = s * (B_k @ A_k) * W0[R_k, C_k]`` (element-wise); ``dW`` is zero elsewhere.

The layer never keeps a weight-sized tensor: :class:`BlockModulatedDelta` builds each block's
``(B_k A_k) * W0[R_k, C_k]`` (``out * in / K^2`` entries) for one matmul, drops it, and rebuilds it
in the backward pass from the frozen weight, which it reads again rather than saving.
:class:`ModulatedLinear` computes ``base(x) + dW x`` at once where that is exact (``kit/fused.py``):
a few rows of ``W0 + dW`` at a time, in the blocks' order, so the update costs no matmul of its own
in the forward or in the input gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..kit.merge_checks import checked_finite

__all__ = [
    "Block",
    "BlockLayout",
    "BlockModulatedDelta",
    "ModulatedLinear",
    "block_ranks",
    "check_order",
    "delta_weight",
    "merged_weight",
    "spectral_order",
    "spectral_orders",
    "split_sizes",
]

# Centroids closer than (number of singular components) / 2**16 count as equal and keep index order,
# so that the last-bit differences between LAPACK builds or thread counts rarely reorder rows.
_CENTROID_RESOLUTION_BITS = 16


def split_sizes(total: int, parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous groups of ``total`` items, the first ``total % parts`` one larger."""
    base, extra = divmod(total, parts)
    return [base + (1 if index < extra else 0) for index in range(parts)]


def block_ranks(r: int, num_blocks: int, branch_ranks: list[int] | tuple[int, ...] | None = None) -> list[int]:
    """Rank of each block: ``branch_ranks`` as given, else ``r`` split as evenly as possible (first blocks larger)."""
    return list(branch_ranks) if branch_ranks is not None else split_sizes(r, num_blocks)


class Block(NamedTuple):
    """One block with a non-zero rank: its rows and columns, its factors (views), their flat offsets, and where
    its rows and columns start in the orderings."""

    rows: torch.Tensor
    cols: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    a_at: int
    b_at: int
    row_at: int
    col_at: int


@dataclass(frozen=True)
class BlockLayout:
    """Sizes of the ``K`` blocks of one layer and where each block's ``A_k`` / ``B_k`` sit in the flat tensors."""

    row_sizes: tuple[int, ...]
    col_sizes: tuple[int, ...]
    ranks: tuple[int, ...]

    @classmethod
    def of(cls, out_features: int, in_features: int, ranks: list[int]) -> BlockLayout:
        k = len(ranks)
        return cls(tuple(split_sizes(out_features, k)), tuple(split_sizes(in_features, k)), tuple(ranks))

    @property
    def a_numel(self) -> int:
        return sum(r * c for r, c in zip(self.ranks, self.col_sizes, strict=True))

    @property
    def b_numel(self) -> int:
        return sum(n * r for n, r in zip(self.row_sizes, self.ranks, strict=True))

    def blocks(
        self, a_flat: torch.Tensor, b_flat: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, with_empty: bool = False
    ) -> Iterator[Block]:
        """Every block with a non-zero rank, or every block with ``with_empty`` (factors: views, not copies)."""
        a_at = b_at = row_at = col_at = 0
        for n_rows, n_cols, rank in zip(self.row_sizes, self.col_sizes, self.ranks, strict=True):
            if rank > 0 or with_empty:
                a = a_flat[a_at : a_at + rank * n_cols].view(rank, n_cols)
                b = b_flat[b_at : b_at + n_rows * rank].view(n_rows, rank)
                yield Block(
                    rows[row_at : row_at + n_rows], cols[col_at : col_at + n_cols], a, b, a_at, b_at, row_at, col_at
                )
            a_at, b_at = a_at + rank * n_cols, b_at + n_rows * rank
            row_at, col_at = row_at + n_rows, col_at + n_cols


# ------------------------------------------------------------------------------------------------ orderings


def spectral_order(vectors: torch.Tensor, singular_values: torch.Tensor) -> torch.Tensor:
    """Coordinates sorted by spectral centroid, ascending (int64).

    ``vectors``: ``[n, q]`` singular vectors (``U``, or ``V`` for columns). Coordinate ``i``'s energy in
    component ``j`` is ``(vectors[i, j] * sigma_j)^2``; its centroid is the energy-weighted mean ``j``.
    Coordinates without energy (zero rows) get centroid 0. Ties (within ``q / 2**16``) keep index order.
    """
    n, q = vectors.shape
    if n == 0 or q == 0:
        return torch.arange(n, dtype=torch.int64, device=vectors.device)
    energy = (vectors.double() * singular_values.double()).square()
    total = energy.sum(dim=1)
    weighted = energy @ torch.arange(q, dtype=torch.float64, device=vectors.device)
    centroid = torch.where(total > 0, weighted / total.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    quantized = torch.round(centroid * ((1 << _CENTROID_RESOLUTION_BITS) / q)).to(torch.int64)
    return torch.sort(quantized, stable=True).indices


def spectral_orders(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)``: the row and column orderings of ``weight`` (``[out, in]``), from one float32 SVD.

    Runs on the weight's device; falls back to the CPU when the device's SVD fails (as the authors' code).
    """
    matrix = weight.detach().to(torch.float32)
    try:
        u, sigma, vh = torch.linalg.svd(matrix, full_matrices=False)
    except RuntimeError:
        u, sigma, vh = torch.linalg.svd(matrix.cpu(), full_matrices=False)
    rows, cols = spectral_order(u, sigma), spectral_order(vh.T, sigma)
    return rows.to(weight.device), cols.to(weight.device)


def check_order(order: torch.Tensor, size: int) -> str | None:
    """``None`` when ``order`` is a permutation of ``range(size)`` as an integer vector, else what is wrong."""
    if order.dtype.is_floating_point or order.dtype == torch.bool or order.is_complex():
        return f"dtype {order.dtype} (an integer permutation is needed)"
    if tuple(order.shape) != (size,):
        return f"shape {tuple(order.shape)} (expected ({size},))"
    if order.is_meta:
        return None
    expected = torch.arange(size, device=order.device, dtype=torch.int64)
    if not torch.equal(torch.sort(order.to(torch.int64)).values, expected):
        return f"values that are not a permutation of 0..{size - 1}"
    return None


# ------------------------------------------------------------------------------------------------ forward


WeightReader = Callable[[], AbstractContextManager[torch.Tensor]]


def _block_of(weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``W0[rows, cols]`` (a gathered copy) in ``dtype``.

    Rows first, then columns: two ``index_select`` calls read whole rows and are ~1.4x faster on the CPU than
    one 2-D advanced index (4096 x 4096 float32, half the rows and columns: 20 ms vs 27 ms on 2 cores).
    """
    return weight.index_select(0, rows).index_select(1, cols).to(dtype)


def _inverse(order: torch.Tensor) -> torch.Tensor:
    """The inverse permutation of ``order``."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def _to_block_order(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``[..., n]`` activations as ``[n (in ``order``), tokens]``: every block then reads contiguous rows."""
    return t.reshape(-1, t.shape[-1]).t().index_select(0, order)


def _from_block_order(t_t: torch.Tensor, order: torch.Tensor, leading: torch.Size) -> torch.Tensor:
    """The inverse of :func:`_to_block_order`: ``[n (in ``order``), tokens]`` back to ``[*leading, n]``."""
    return t_t.index_select(0, _inverse(order)).t().contiguous().view(*leading, order.numel())


class BlockModulatedDelta(torch.autograd.Function):
    """``dW x`` without the scale ``s``: ``[..., in] -> [..., out]``, in ``a_flat``'s dtype.

    Computes in ``a_flat``'s dtype under autocast as well (as the CSR bypass of NeuroAda does). Saves
    ``x``, the flat factors and the orderings; the frozen weight is read through ``read_weight``
    (a context manager yielding the full ``[out, in]`` weight) in the forward and again in the backward.
    Activations are permuted once into the blocks' order and transposed (``[features, tokens]``), so
    every block reads and writes contiguous rows; one gather puts the result back in natural order.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        a_flat: torch.Tensor,
        b_flat: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
        layout: BlockLayout,
        read_weight: WeightReader,
    ) -> torch.Tensor:
        dtype, out_features = a_flat.dtype, rows.shape[0]
        x_t = _to_block_order(x, cols).to(dtype)  # [in (block order), tokens]
        y_t = x_t.new_zeros(out_features, x_t.shape[1])  # [out (block order), tokens]
        # In the adapter's dtype under autocast too: autocast would give the matmuls another output dtype.
        with torch.autocast(x.device.type, enabled=False), read_weight() as weight:
            for blk in layout.blocks(a_flat, b_flat.to(dtype), rows, cols):
                block = (blk.b @ blk.a).mul_(_block_of(weight, blk.rows, blk.cols, dtype))  # (B_k A_k) * W0[R_k, C_k]
                row_at, col_at = blk.row_at, blk.col_at
                torch.mm(block, x_t[col_at : col_at + blk.cols.numel()], out=y_t[row_at : row_at + blk.rows.numel()])
                del block
        ctx.save_for_backward(x, a_flat, b_flat, rows, cols)
        ctx.layout, ctx.read_weight = layout, read_weight
        return _from_block_order(y_t, rows, x.shape[:-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, a_flat, b_flat, rows, cols = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        dtype = a_flat.dtype
        x_t = _to_block_order(x, cols).to(dtype)
        grad_t = _to_block_order(grad, rows).to(dtype)  # [out (block order), tokens]
        b_compute = b_flat.to(dtype)
        grad_x_t = torch.zeros_like(x_t) if need_x else None
        grad_a = torch.zeros_like(a_flat) if need_a else None
        grad_b = torch.zeros_like(b_compute) if need_b else None
        with torch.autocast(x.device.type, enabled=False), ctx.read_weight() as weight:
            for blk in ctx.layout.blocks(a_flat, b_compute, rows, cols):
                anchor = _block_of(weight, blk.rows, blk.cols, dtype)
                row_at, col_at = blk.row_at, blk.col_at
                grad_k = grad_t[row_at : row_at + blk.rows.numel()]  # [R_k, tokens]
                if need_x:
                    block = (blk.b @ blk.a).mul_(anchor)
                    torch.mm(block.T, grad_k, out=grad_x_t[col_at : col_at + blk.cols.numel()])
                    del block
                if need_a or need_b:
                    grad_product = (grad_k @ x_t[col_at : col_at + blk.cols.numel()].T).mul_(anchor)  # d/d(B_k A_k)
                    if need_a:
                        grad_a[blk.a_at : blk.a_at + blk.a.numel()] = (blk.b.T @ grad_product).reshape(-1)
                    if need_b:
                        grad_b[blk.b_at : blk.b_at + blk.b.numel()] = (grad_product @ blk.a.T).reshape(-1)
                    del grad_product
                del anchor
        grad_x = None
        if grad_x_t is not None:
            grad_x = _from_block_order(grad_x_t, cols, x.shape[:-1]).to(x.dtype)
        return grad_x, grad_a, None if grad_b is None else grad_b.to(b_flat.dtype), None, None, None, None


# Rows of ``W0 + dW`` built at a time by ModulatedLinear: bounds its transient to 16 MiB of float32
# (a 11008 x 4096 projection: ~1000 rows per chunk) while keeping each matmul large.
_FUSED_CHUNK_ENTRIES = 1 << 22


def _row_chunks(blk: Block, in_features: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` row ranges within block ``blk`` (at least one row each, ~_FUSED_CHUNK_ENTRIES entries)."""
    n_rows = blk.rows.numel()
    step = max(1, _FUSED_CHUNK_ENTRIES // max(1, in_features))
    for start in range(0, n_rows, step):
        yield start, min(start + step, n_rows)


def _modulation(b_rows: torch.Tensor, a: torch.Tensor, scaling: float) -> torch.Tensor:
    """``1 + s * (B_k[rows] @ A_k)`` in one addmm (the broadcast 1 is added in the same pass)."""
    return torch.addmm(a.new_ones(()), b_rows, a, alpha=scaling)


def _modulated_rows(weight: torch.Tensor, blk: Block, start: int, stop: int, cols: torch.Tensor) -> torch.Tensor:
    """Rows ``start:stop`` of block ``blk``'s row group of ``W0``, all columns in block order: ``[stop - start, in]``."""
    return weight.index_select(0, blk.rows[start:stop]).index_select(1, cols)


class ModulatedLinear(torch.autograd.Function):
    """``x @ (W0 + s dW).T`` (no bias), ``dW`` as :class:`BlockModulatedDelta`'s: one matmul per row chunk.

    For a frozen plain linear weight in float32 (full-precision matmuls) or float64 only: the update is
    rounded into the weight (``kit/fused.py`` says when that is exact). Saves what
    :class:`BlockModulatedDelta` saves; each chunk of ``W0 + s dW`` is rebuilt from the frozen weight in
    the backward pass. Per step the update costs one block-sized matmul (its factors' gradient) instead of
    three.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        a_flat: torch.Tensor,
        b_flat: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
        layout: BlockLayout,
        scaling: float,
        read_weight: WeightReader,
    ) -> torch.Tensor:
        out_features, in_features = rows.shape[0], cols.shape[0]
        x_t = _to_block_order(x, cols)  # [in (block order), tokens]
        y_t = x_t.new_empty(out_features, x_t.shape[1])  # [out (block order), tokens]
        with read_weight() as weight:
            for blk in layout.blocks(a_flat, b_flat, rows, cols, with_empty=True):
                col_at, col_to = blk.col_at, blk.col_at + blk.cols.numel()
                for start, stop in _row_chunks(blk, in_features):
                    chunk = _modulated_rows(weight, blk, start, stop, cols)
                    if blk.a.numel():
                        chunk[:, col_at:col_to].mul_(_modulation(blk.b[start:stop], blk.a, scaling))  # W0 (1 + s B A)
                    torch.mm(chunk, x_t, out=y_t[blk.row_at + start : blk.row_at + stop])
                    del chunk
        ctx.save_for_backward(x, a_flat, b_flat, rows, cols)
        ctx.layout, ctx.scaling, ctx.read_weight = layout, scaling, read_weight
        return _from_block_order(y_t, rows, x.shape[:-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, a_flat, b_flat, rows, cols = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        scaling, in_features = ctx.scaling, cols.shape[0]
        x_t = _to_block_order(x, cols)
        grad_t = _to_block_order(grad, rows)  # [out (block order), tokens]
        grad_x_t = torch.zeros_like(x_t) if need_x else None
        grad_a = torch.zeros_like(a_flat) if need_a else None
        grad_b = torch.zeros_like(b_flat) if need_b else None
        with ctx.read_weight() as weight:
            for blk in ctx.layout.blocks(a_flat, b_flat, rows, cols, with_empty=True):
                col_at, col_to = blk.col_at, blk.col_at + blk.cols.numel()
                grad_a_k = None if grad_a is None else grad_a[blk.a_at : blk.a_at + blk.a.numel()].view_as(blk.a)
                grad_b_k = None if grad_b is None else grad_b[blk.b_at : blk.b_at + blk.b.numel()].view_as(blk.b)
                for start, stop in _row_chunks(blk, in_features):
                    chunk = _modulated_rows(weight, blk, start, stop, cols)
                    block = chunk[:, col_at:col_to]  # W0 on the block, for now
                    grad_k = grad_t[blk.row_at + start : blk.row_at + stop]  # [chunk rows, tokens]
                    if blk.a.numel() and (need_a or need_b):
                        grad_product = (grad_k @ x_t[col_at:col_to].T).mul_(block).mul_(scaling)  # d/d(B_k A_k)
                        if grad_a_k is not None:
                            grad_a_k.addmm_(blk.b[start:stop].T, grad_product)
                        if grad_b_k is not None:
                            torch.mm(grad_product, blk.a.T, out=grad_b_k[start:stop])
                        del grad_product
                    if grad_x_t is not None:
                        if blk.a.numel():
                            block.mul_(_modulation(blk.b[start:stop], blk.a, scaling))
                        grad_x_t.addmm_(chunk.T, grad_k)
                    del chunk, block
        grad_x = None
        if grad_x_t is not None:
            grad_x = _from_block_order(grad_x_t, cols, x.shape[:-1])
        return grad_x, grad_a, grad_b, None, None, None, None, None


# ------------------------------------------------------------------------------------------------ merge


def delta_weight(
    weight: torch.Tensor,
    a_flat: torch.Tensor,
    b_flat: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    layout: BlockLayout,
    scaling: float,
) -> torch.Tensor:
    """The dense ``dW`` (``[out, in]``; float32, float64 for a float64 weight) of the original weight ``weight``;
    for merging only."""
    compute = torch.promote_types(weight.dtype, torch.float32)
    delta = torch.zeros(weight.shape, dtype=compute, device=weight.device)
    a_flat, b_flat = a_flat.detach().to(weight.device, compute), b_flat.detach().to(weight.device, compute)
    rows, cols = rows.to(weight.device), cols.to(weight.device)
    for blk in layout.blocks(a_flat, b_flat, rows, cols):
        block = (blk.b @ blk.a).mul_(_block_of(weight, blk.rows, blk.cols, compute)).mul_(scaling)
        delta[blk.rows[:, None], blk.cols[None, :]] = block
    return delta


def merged_weight(
    current: torch.Tensor,
    original: torch.Tensor,
    a_flat: torch.Tensor,
    b_flat: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    layout: BlockLayout,
    scaling: float,
    what: str = "an SMoA adapter",
) -> torch.Tensor:
    """``current + dW(original)`` computed in float32 (float64 for float64 weights), returned in ``current``'s dtype (:class:`MergeError` for NaN/inf).

    ``original`` is the weight before any adapter was merged: SMoA's update modulates it, so a second
    adapter merged on top still reads the pre-merge weight.
    """
    delta = delta_weight(original, a_flat, b_flat, rows, cols, layout, scaling)
    merged = (current.to(delta.dtype) + delta).to(current.dtype)
    return checked_finite(merged, what=what)

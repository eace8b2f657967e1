"""The sparse bypass ``delta[..., i] = sum_j theta[i, j] * x[..., idx[i, j]]`` without a dense weight.

The official code (and PEFT's Super-Tuning/SHiRA) computes ``x @ (W + scatter(theta)).T``,
which materialises a weight-sized tensor per layer and per call and keeps it alive for
backward. Here the bypass is a gather plus a multiply: forward and backward touch only
``tokens x out x k`` values, and the only tensor kept for backward is the input (only when
theta trains, and only the columns the selection reads when they are few, see
:func:`compact_columns`). Gradients (with ``g = dL/d delta``):

* ``dL/dtheta[i, j] = sum_t g[t, i] * x[t, idx[i, j]]``
* ``dL/dx[t, c]    = sum_{(i, j): idx[i, j] = c} g[t, i] * theta[i, j]`` (an index_add)

Arithmetic runs in ``promote(x.dtype, theta.dtype)``: with fp32 theta on a bf16 model the
products and the sum over tokens of ``dL/dtheta`` are accumulated in fp32.
"""

from __future__ import annotations

from typing import Any

import torch

from .csr_bypass import CsrBypass, CsrPattern, csr_path_supported

# Upper bound (elements) of each work buffer: a block of [rows, out, cols] (token rows x output
# neurons x connection columns), 16 MiB in fp32. At least one row and one column whatever the
# bound; the output and dL/dx themselves are the only tensors allowed to be larger.
_CHUNK_ELEMENTS = 1 << 22

# Keep only the selected input columns for backward when they are at most this share of the input.
# Magnitude selection concentrates on few inputs (SmolLM2, k=1: k/v/down projections read ~25% of
# their inputs, o ~44%), and dL/dtheta needs nothing else. Above the share, the whole input is
# kept instead: it costs no copy and is often kept alive by a sibling (q/k/v share one input).
COMPACT_SAVE_MAX_SHARE = 0.5


def compact_columns(indices: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(columns, local_indices)`` for saving only the columns ``indices`` reads, or ``None``.

    ``columns`` are the sorted distinct input columns, ``local_indices`` (shape of ``indices``)
    point into them, so ``x[..., indices] == x[..., columns][..., local_indices]``. ``None``
    when the distinct columns exceed ``COMPACT_SAVE_MAX_SHARE`` of ``in_features``.
    """
    columns, local_indices = torch.unique(indices, sorted=True, return_inverse=True)
    if columns.numel() > COMPACT_SAVE_MAX_SHARE * in_features:
        return None
    return columns, local_indices.view_as(indices)


def _blocks(tokens: int, out_features: int, k: int) -> tuple[int, int]:
    """(rows, cols) of a work block: all columns at once when tokens are few, else slabs of rows.

    Few ops per call matter as much as few bytes: a per-column loop at k=20 launches ~100
    small kernels per layer (slow on a GPU and on a contended CPU).
    """
    rows = max(1, min(tokens, _CHUNK_ELEMENTS // max(1, out_features)))
    cols = max(1, min(k, _CHUNK_ELEMENTS // max(1, rows * out_features)))
    return rows, cols


def _column_blocks(indices: torch.Tensor, cols: int) -> list[tuple[int, int, torch.Tensor]]:
    """``(start, stop, flat_indices)`` per block of connection columns (``flat`` is [out * width])."""
    k = indices.shape[1]
    return [(c0, min(k, c0 + cols), indices[:, c0 : c0 + cols].reshape(-1)) for c0 in range(0, k, cols)]


class SparseBypass(torch.autograd.Function):
    """Autograd function for the NeuroAda bypass; see the module docstring for the math.

    The op is bound by fresh allocations more than by arithmetic (on CPU every large new
    tensor page-faults on first touch). Work runs in blocks of ``[rows, out, cols]`` through at most two reused buffers of
    ``_CHUNK_ELEMENTS``; everything else is in place. On CPU every fresh large tensor is an
    mmap that page-faults on first touch (~10x the cost of an in-place pass over it), so the
    number of allocations, not the arithmetic, sets the speed of this op.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        theta: torch.Tensor,
        indices: torch.Tensor,
        compact: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        out_features, k = indices.shape
        compute_dtype = torch.promote_types(x.dtype, theta.dtype)
        x2d = x.reshape(-1, x.shape[-1])
        tokens = x2d.shape[0]
        theta_c = theta.to(compute_dtype)
        rows, cols = _blocks(tokens, out_features, k)
        delta = torch.empty(tokens, out_features, dtype=compute_dtype, device=x.device)
        buffer = converted = None
        for start in range(0, tokens, rows):
            stop = min(tokens, start + rows)
            n = stop - start
            x_block, delta_block = x2d[start:stop], delta[start:stop]
            for c0, c1, flat in _column_blocks(indices, cols):
                width = c1 - c0
                if width == 1 and c0 == 0 and x.dtype == compute_dtype:
                    # First (for k=1 the only) column: gather straight into the output rows.
                    torch.index_select(x_block, 1, flat, out=delta_block)
                    delta_block.mul_(theta_c[:, 0])
                    continue
                if buffer is None:
                    buffer = torch.empty(rows * out_features * cols, dtype=x.dtype, device=x.device)
                gathered = buffer[: n * out_features * width].view(n, out_features * width)
                torch.index_select(x_block, 1, flat, out=gathered)
                if width == 1:
                    if c0 == 0:
                        torch.mul(gathered, theta_c[:, 0], out=delta_block)  # promotes, e.g. bf16 -> fp32
                    else:
                        delta_block.addcmul_(gathered, theta_c[:, c0])
                    continue
                block = gathered.view(n, out_features, width)
                if block.dtype != compute_dtype:
                    if converted is None:
                        converted = torch.empty(buffer.numel(), dtype=compute_dtype, device=x.device)
                    block = converted[: block.numel()].view_as(block).copy_(block)
                block.mul_(theta_c[:, c0:c1])
                if c0 == 0:
                    torch.sum(block, -1, out=delta_block)
                else:
                    delta_block.add_(block.sum(-1))
        # dL/dx needs only theta and the indices; dL/dtheta needs the selected input columns.
        ctx.input_shape, ctx.input_dtype = x.shape, x.dtype
        if not ctx.needs_input_grad[1]:
            saved_x, gather_indices = None, indices
        elif compact is not None:
            saved_x, gather_indices = x2d.index_select(1, compact[0]), compact[1]
        else:
            saved_x, gather_indices = x, indices
        ctx.save_for_backward(saved_x, theta, indices, gather_indices)
        return delta.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx: Any, grad_delta: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        saved_x, theta, indices, gather_indices = ctx.saved_tensors
        input_shape, input_dtype = ctx.input_shape, ctx.input_dtype
        out_features, k = indices.shape
        compute_dtype = torch.promote_types(input_dtype, theta.dtype)
        tokens = grad_delta.numel() // out_features
        # The rows dL/dtheta gathers from: the whole input, or only its selected columns.
        x2d = saved_x.reshape(tokens, saved_x.shape[-1]) if saved_x is not None else None
        g = grad_delta.reshape(tokens, out_features).to(compute_dtype)
        want_x, want_theta = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        theta_c = theta.to(compute_dtype)
        rows, cols = _blocks(tokens, out_features, k)

        device = grad_delta.device
        grad_theta = torch.zeros(out_features, k, dtype=compute_dtype, device=device) if want_theta else None
        # Allocated in x's own shape and returned as is (not as a view of a 2-D tensor): autograd
        # can then add the frozen path's dL/dx into it in place instead of allocating a third
        # [tokens, in] tensor (in-place accumulation needs the sole owner of a storage).
        grad_x = torch.zeros(input_shape, dtype=compute_dtype, device=device) if want_x else None
        grad_x2d = grad_x.view(tokens, input_shape[-1]) if grad_x is not None else None
        work = torch.empty(rows * out_features * cols, dtype=compute_dtype, device=device)
        same_dtype = input_dtype == compute_dtype
        gather_buffer = work if same_dtype or not want_theta else torch.empty_like(work, dtype=input_dtype)
        blocks = list(zip(_column_blocks(indices, cols), _column_blocks(gather_indices, cols), strict=True))
        for start in range(0, tokens, rows):
            stop = min(tokens, start + rows)
            n = stop - start
            g_block = g[start:stop].unsqueeze(-1)
            for (c0, c1, flat), (_, _, gather_flat) in blocks:
                size = n * out_features * (c1 - c0)
                block = work[:size].view(n, out_features, c1 - c0)
                if want_theta:
                    # dL/dtheta[i, j] = sum_t g[t, i] * x[t, idx[i, j]], accumulated in compute dtype
                    gathered = gather_buffer[:size].view(n, -1)
                    torch.index_select(x2d[start:stop], 1, gather_flat, out=gathered)
                    if same_dtype:
                        block.mul_(g_block)
                    else:
                        torch.mul(gathered.view_as(block), g_block, out=block)
                    grad_theta[:, c0:c1] += block.sum(0)
                if want_x:
                    # dL/dx[t, idx[i, j]] += g[t, i] * theta[i, j]
                    torch.mul(g_block, theta_c[:, c0:c1], out=block)
                    grad_x2d[start:stop].index_add_(1, flat, block.view(n, -1))

        del grad_x2d
        if grad_x is not None:
            grad_x = grad_x.to(input_dtype)
        if grad_theta is not None:
            grad_theta = grad_theta.to(theta.dtype)
        return grad_x, grad_theta, None, None


def sparse_bypass(
    x: torch.Tensor,
    theta: torch.Tensor,
    indices: torch.Tensor,
    compact: tuple[torch.Tensor, torch.Tensor] | None = None,
    csr: CsrPattern | None = None,
) -> torch.Tensor:
    """Return ``delta`` with ``delta[..., i] = sum_j theta[i, j] * x[..., indices[i, j]]``.

    Args:
        x: Input ``[..., in]``.
        theta: Trainable values ``[out, k]``.
        indices: ``int64`` input indices ``[out, k]``.
        compact: :func:`compact_columns` of ``indices`` (computed once per layer by the caller):
            backward then keeps ``x[..., columns]`` instead of ``x``. Same results either way.
        csr: :func:`~.csr_bypass.csr_pattern` of ``indices`` (built once per layer by the
            caller, with the same ``compact``): run the SpMM/SDDMM path where it is supported
            (:func:`~.csr_bypass.csr_path_supported`), the gather path otherwise.

    Returns:
        ``[..., out]`` in ``promote(x.dtype, theta.dtype)``; no ``[out, in]`` tensor is built.
    """
    if csr is not None and csr_path_supported(x, theta):
        return CsrBypass.apply(x, theta, csr)
    return SparseBypass.apply(x, theta, indices, compact)


def merged_entries(original: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """New values of the adapted weight entries: ``original + theta``, rounded once to the weight dtype.

    The sum is formed in ``promote(weight dtype, theta dtype)`` (fp32 for a bf16 weight with
    fp32 theta). The in-memory merge and the streaming checkpoint merge both call this, so
    their results agree bit for bit.
    """
    compute_dtype = torch.promote_types(original.dtype, theta.dtype)
    return (original.to(compute_dtype) + theta.to(compute_dtype)).to(original.dtype)

"""The bypass as sparse matrix products, for k >= 2 connections per neuron on the CPU.

The gather path (:class:`functional.SparseBypass`) materialises ``tokens x out x k`` values
per call: cheap at k = 1, memory-bound from k = 2 on (k = 20 on SmolLM2 shapes: ~160 ms per
layer and step against ~12 ms here). With the selection held as a fixed CSR pattern whose
values are theta, the same three products need no such buffer and still no ``[out, in]``
tensor:

* forward ``delta^T = S @ x^T`` (SpMM),
* ``dL/dx^T = S^T @ g^T`` (SpMM with the transposed pattern, precomputed once),
* ``dL/dtheta = (g^T @ x) sampled at the pattern`` (SDDMM, ``torch.sparse.sampled_addmm``:
  only the ``out x k`` selected dot products are formed).

Only fp32/fp64 arithmetic and the CPU are taken here: PyTorch's CPU CSR kernels have no
bf16/fp16, and on CUDA this path has not been measured against the gather path.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

# Fewest connections per neuron for which the CSR path is used: measured on 2 CPU cores (fp32,
# SmolLM2 and 7B shapes, fwd+bwd per layer) the gather path wins at k = 1 (5 vs 7 ms) and
# loses from k = 2 on (14 vs 7 ms at k = 2, 160 vs 12 ms at k = 20).
CSR_MIN_K = 2

_CSR_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class CsrPattern:
    """A selection ``indices [out, k]`` as CSR structure, built once per indices tensor.

    CSR wants each row's columns ascending; theta keeps the selection's own order, so
    ``value_order`` lists theta's flat positions in CSR order (``None`` when rows are already
    sorted; ``value_order_inverse`` maps back). ``t_*`` describe the transposed pattern
    ``[in, out]`` for ``dL/dx``. ``saved_col``/``saved_width`` give the pattern's columns in the
    coordinates of the input kept for backward: ``saved_columns`` (the compact columns of
    :func:`functional.compact_columns`) or, when ``None``, the whole input.
    """

    out_features: int
    in_features: int
    value_order: torch.Tensor | None
    value_order_inverse: torch.Tensor | None
    crow: torch.Tensor
    col: torch.Tensor
    t_value_order: torch.Tensor
    t_crow: torch.Tensor
    t_col: torch.Tensor
    saved_col: torch.Tensor
    saved_width: int
    saved_columns: torch.Tensor | None

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        """``S [out, in]`` with CSR-ordered ``values``."""
        return _csr(self.crow, self.col, values, (self.out_features, self.in_features))

    def transposed(self, values: torch.Tensor) -> torch.Tensor:
        """``S^T [in, out]`` from the same CSR-ordered ``values``."""
        return _csr(
            self.t_crow, self.t_col, values.index_select(0, self.t_value_order), (self.in_features, self.out_features)
        )

    def saved_matrix(self, values: torch.Tensor) -> torch.Tensor:
        """The pattern over the columns kept for backward: ``[out, saved_width]``."""
        return _csr(self.crow, self.saved_col, values, (self.out_features, self.saved_width))


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # PyTorch flags every CSR tensor as "beta"; the kernels used here are stable
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def csr_pattern(
    indices: torch.Tensor, in_features: int, compact: tuple[torch.Tensor, torch.Tensor] | None = None
) -> CsrPattern:
    """Build the :class:`CsrPattern` of ``indices`` (distinct columns within each row).

    Index tensors are int32 when every count fits (half the memory of the selection's int64).
    """
    out_features, k = indices.shape
    device = indices.device
    index_dtype = torch.int32 if max(out_features * k, in_features, out_features) < 2**31 - 1 else torch.int64
    sorted_cols, order = indices.sort(dim=1)
    rows = torch.arange(out_features, device=device)
    already_sorted = bool(torch.equal(order, torch.arange(k, device=device).expand(out_features, k)))
    value_order = value_order_inverse = None
    if not already_sorted:
        value_order = (order + rows[:, None] * k).reshape(-1)
        value_order_inverse = torch.empty_like(value_order)
        value_order_inverse[value_order] = torch.arange(value_order.numel(), device=device)
        value_order, value_order_inverse = value_order.to(index_dtype), value_order_inverse.to(index_dtype)
    col = sorted_cols.reshape(-1)
    row_of_entry = rows.repeat_interleave(k)
    t_order = torch.argsort(col * out_features + row_of_entry)  # column-major; keys are distinct
    t_crow = torch.zeros(in_features + 1, dtype=torch.int64, device=device)
    t_crow[1:] = torch.bincount(col, minlength=in_features).cumsum(0)
    if compact is None:
        saved_columns, saved_col, saved_width = None, col, in_features
    else:
        saved_columns, local_indices = compact
        saved_col, saved_width = local_indices.gather(1, order).reshape(-1), int(saved_columns.numel())
    return CsrPattern(
        out_features=out_features,
        in_features=in_features,
        value_order=value_order,
        value_order_inverse=value_order_inverse,
        crow=torch.arange(0, out_features * k + 1, k, device=device, dtype=index_dtype),
        col=col.to(index_dtype),
        t_value_order=t_order.to(index_dtype),
        t_crow=t_crow.to(index_dtype),
        t_col=row_of_entry[t_order].to(index_dtype),
        saved_col=saved_col.to(index_dtype),
        saved_width=saved_width,
        saved_columns=saved_columns,
    )


def csr_path_supported(x: torch.Tensor, theta: torch.Tensor) -> bool:
    """Whether :class:`CsrBypass` runs for these inputs (CPU, fp32/fp64 arithmetic)."""
    return x.device.type == "cpu" and torch.promote_types(x.dtype, theta.dtype) in _CSR_DTYPES


def _csr_values(theta: torch.Tensor, pattern: CsrPattern) -> torch.Tensor:
    flat = theta.reshape(-1)
    return flat if pattern.value_order is None else flat.index_select(0, pattern.value_order)


class CsrBypass(torch.autograd.Function):
    """Autograd function for the bypass through SpMM/SDDMM; same results as the gather path."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        theta: torch.Tensor,
        pattern: CsrPattern,
    ) -> torch.Tensor:
        compute_dtype = torch.promote_types(x.dtype, theta.dtype)
        x2d = x.reshape(-1, x.shape[-1])
        values = _csr_values(theta.to(compute_dtype), pattern)
        with _no_autocast(x.device):  # autocast would send the SpMM to bf16, which the CPU kernel lacks
            delta_t = torch.sparse.mm(pattern.matrix(values), x2d.to(compute_dtype).T)  # [out, tokens]
        ctx.pattern, ctx.input_shape, ctx.input_dtype = pattern, x.shape, x.dtype
        if not ctx.needs_input_grad[1]:
            saved_x = None  # dL/dx needs only theta and the pattern
        elif pattern.saved_columns is not None:
            saved_x = x2d.index_select(1, pattern.saved_columns)
        else:
            saved_x = x
        ctx.save_for_backward(saved_x, theta)
        # [tokens, out] as a transposed view: tokens have stride 1, so the batch split is a view too.
        return delta_t.T.view(*x.shape[:-1], pattern.out_features)

    @staticmethod
    def backward(ctx: Any, grad_delta: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        saved_x, theta = ctx.saved_tensors
        pattern: CsrPattern = ctx.pattern
        compute_dtype = torch.promote_types(ctx.input_dtype, theta.dtype)
        g = grad_delta.reshape(-1, pattern.out_features).to(compute_dtype)
        grad_x = grad_theta = None
        with _no_autocast(g.device):
            if ctx.needs_input_grad[0]:
                values = _csr_values(theta.to(compute_dtype), pattern)
                grad_x_t = torch.sparse.mm(pattern.transposed(values), g.T)  # [in, tokens]
                grad_x = grad_x_t.T.reshape(ctx.input_shape).to(ctx.input_dtype)
            if ctx.needs_input_grad[1]:
                x2d = saved_x.reshape(g.shape[0], saved_x.shape[-1]).to(compute_dtype)
                zeros = torch.zeros(pattern.col.numel(), dtype=compute_dtype, device=g.device)
                sampled = torch.sparse.sampled_addmm(pattern.saved_matrix(zeros), g.T, x2d, beta=0.0).values()
                if pattern.value_order_inverse is not None:
                    sampled = sampled.index_select(0, pattern.value_order_inverse)
                grad_theta = sampled.view(theta.shape).to(theta.dtype)
        return grad_x, grad_theta, None


def _no_autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device_type=device.type, enabled=False)

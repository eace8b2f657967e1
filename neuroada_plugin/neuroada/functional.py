"""The sparse bypass ``delta[..., i] = sum_j theta[i, j] * x[..., idx[i, j]]`` without a dense weight.

The official code (and PEFT's Super-Tuning/SHiRA) computes ``x @ (W + scatter(theta)).T``,
which materialises a weight-sized tensor per layer and per call and keeps it alive for
backward. Here the bypass is a gather plus a multiply: forward and backward touch only
``tokens x out x k`` values, and the only tensor kept for backward is ``x`` (which the
frozen base matmul keeps anyway). Gradients (with ``g = dL/d delta``):

* ``dL/dtheta[i, j] = sum_t g[t, i] * x[t, idx[i, j]]``
* ``dL/dx[t, c]    = sum_{(i, j): idx[i, j] = c} g[t, i] * theta[i, j]`` (an index_add)

Arithmetic runs in ``promote(x.dtype, theta.dtype)``: with fp32 theta on a bf16 model the
products and the sum over tokens of ``dL/dtheta`` are accumulated in fp32.
"""

from __future__ import annotations

import torch

# Upper bound (elements) for the [tokens, out, chunk] temporaries; one connection column
# (a [tokens, out] tensor, the size of the layer's output) is always allowed.
_CHUNK_ELEMENTS = 1 << 24


def _gather_columns(x2d: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``x2d[:, columns]`` for ``columns`` of shape [out, c]: returns [tokens, out, c]."""
    out_features, chunk = columns.shape
    return x2d.index_select(1, columns.reshape(-1)).view(x2d.shape[0], out_features, chunk)


class SparseBypass(torch.autograd.Function):
    """Autograd function for the NeuroAda bypass; see the module docstring for the math."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, theta: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        out_features, k = indices.shape
        compute_dtype = torch.promote_types(x.dtype, theta.dtype)
        x2d = x.reshape(-1, x.shape[-1])
        theta_c = theta.to(compute_dtype)
        delta = torch.zeros(x2d.shape[0], out_features, dtype=compute_dtype, device=x.device)
        step = _step(x2d, out_features, k)
        for start in range(0, k, step):
            stop = min(k, start + step)
            cols = indices[:, start:stop]
            gathered = _gather_columns(x2d, cols).to(compute_dtype)
            delta += (gathered * theta_c[:, start:stop]).sum(-1)
            del gathered
        ctx.save_for_backward(x, theta, indices)
        return delta.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad_delta: torch.Tensor):
        x, theta, indices = ctx.saved_tensors
        out_features, k = indices.shape
        compute_dtype = torch.promote_types(x.dtype, theta.dtype)
        x2d = x.reshape(-1, x.shape[-1])
        g = grad_delta.reshape(-1, out_features).to(compute_dtype)
        want_x, want_theta = ctx.needs_input_grad[0], ctx.needs_input_grad[1]

        grad_theta = torch.empty(out_features, k, dtype=compute_dtype, device=x.device) if want_theta else None
        grad_x = torch.zeros(x2d.shape, dtype=compute_dtype, device=x.device) if want_x else None
        theta_c = theta.to(compute_dtype)
        step = _step(x2d, out_features, k)
        for start in range(0, k, step):
            stop = min(k, start + step)
            cols = indices[:, start:stop]
            if want_theta:
                gathered = _gather_columns(x2d, cols).to(compute_dtype)
                grad_theta[:, start:stop] = (gathered * g.unsqueeze(-1)).sum(0)
                del gathered
            if want_x:
                contribution = g.unsqueeze(-1) * theta_c[:, start:stop]
                grad_x.index_add_(1, cols.reshape(-1), contribution.view(x2d.shape[0], -1))
                del contribution

        if grad_x is not None:
            grad_x = grad_x.view(x.shape).to(x.dtype)
        if grad_theta is not None:
            grad_theta = grad_theta.to(theta.dtype)
        return grad_x, grad_theta, None


def _step(x2d: torch.Tensor, out_features: int, k: int) -> int:
    per_column = max(1, x2d.shape[0] * out_features)
    return max(1, min(k, _CHUNK_ELEMENTS // per_column))


def sparse_bypass(x: torch.Tensor, theta: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Return ``delta`` with ``delta[..., i] = sum_j theta[i, j] * x[..., indices[i, j]]``.

    Args:
        x: Input ``[..., in]``.
        theta: Trainable values ``[out, k]``.
        indices: ``int64`` input indices ``[out, k]``.

    Returns:
        ``[..., out]`` in ``promote(x.dtype, theta.dtype)``; no ``[out, in]`` tensor is built.
    """
    return SparseBypass.apply(x, theta, indices)


def merged_entries(original: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """New values of the adapted weight entries: ``original + theta``, rounded once to the weight dtype.

    The sum is formed in ``promote(weight dtype, theta dtype)`` (fp32 for a bf16 weight with
    fp32 theta). The in-memory merge and the streaming checkpoint merge both call this, so
    their results agree bit for bit.
    """
    compute_dtype = torch.promote_types(original.dtype, theta.dtype)
    return (original.to(compute_dtype) + theta.to(compute_dtype)).to(original.dtype)

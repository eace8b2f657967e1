"""``a @ W0`` for a method whose update is a function of the frozen weight (NEAT, SMoA), on any base.

The weight is read through a *reader*: a callable returning a context manager that yields the full
floating-point ``[out, in]`` weight for the length of the block (``MethodLayer.read_weight``: the
tensor itself on a plain base, gathered read-only under DeepSpeed ZeRO-3, dequantized one layer at a
time for bitsandbytes). The product reads it once in forward and once more in backward
(``d(a @ W0)/da = grad @ W0.T``), and autograd keeps nothing weight-sized in between: no gathered
copy, no dequantized copy, no cast copy. A plain tensor is accepted as well, for callers (the
streaming merge) that already hold the weight.

torch only (the merge rules import this).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

__all__ = ["WeightReader", "frozen_weight_product"]

WeightReader = Callable[[], AbstractContextManager[torch.Tensor]]


def _reader(weight: torch.Tensor | WeightReader) -> WeightReader:
    if isinstance(weight, torch.Tensor):
        return lambda: nullcontext(weight)
    return weight


class _FrozenWeightProduct(torch.autograd.Function):
    """``a @ W0`` in ``a``'s dtype; backward reads W0 again through the reader instead of saving it."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, read: WeightReader) -> torch.Tensor:  # type: ignore[override]
        ctx.read = read
        with read() as weight:
            return a @ weight.detach().to(a.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        with ctx.read() as weight:
            return grad @ weight.detach().to(grad.dtype).T, None


def frozen_weight_product(a: torch.Tensor, weight: torch.Tensor | WeightReader) -> torch.Tensor:
    """``a @ W0`` (``[r, out] @ [out, in]``), differentiable in ``a`` only, W0 read through ``weight``.

    Under ZeRO-3 the reader's gather is a collective: every rank runs the same forward and backward,
    so every rank reads the same layers in the same order, as DeepSpeed's own hooks do.
    """
    read = _reader(weight)
    if torch.is_grad_enabled() and a.requires_grad:
        return _FrozenWeightProduct.apply(a, read)
    with read() as frozen:
        return a @ frozen.detach().to(a.dtype)

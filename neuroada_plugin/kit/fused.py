"""When a layer may compute ``base(x) + adapter(x)`` as one matmul with a transiently modified weight.

A method whose update reads the frozen weight (SMoA's ``(B A) * W0``) can add the update to a copy of
the weight, a row block at a time, and do one matmul instead of the base layer's plus its own: the
update's matmuls disappear from the step. Two things must hold for that to be the same computation:

* the base layer is a plain ``nn.Linear`` whose forward nothing else intercepts (no module hooks:
  DeepSpeed's, accelerate's offload hooks, a user's), since the base forward is not called;
* rounding the update into the weight loses nothing the separate path keeps. The separate path rounds
  the update relative to itself; the fused one rounds ``W0 + dW`` relative to ``W0``. In float32 with
  full-precision matmuls (or float64) that is far below the matmul's own error; in bfloat16/float16,
  under autocast or with TF32 matmuls it would drop every update below half a unit in the last place
  of the weight, i.e. most of training's early steps. Those cases keep the separate path.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["exact_fused_dtype", "plain_linear"]

_FUSED_DTYPES = (torch.float32, torch.float64)


def plain_linear(base: nn.Module) -> bool:
    """``base`` is an ``nn.Linear`` computing ``x @ W.T + b`` with nothing hooked into its forward, and frozen."""
    if not isinstance(base, nn.Linear) or type(base).forward is not nn.Linear.forward or "forward" in vars(base):
        return False
    if base._forward_hooks or base._forward_pre_hooks or base.weight.requires_grad:
        return False
    return base.weight.dim() == 2 and not base.weight.is_meta


def _full_precision_float32_matmul(device: torch.device) -> bool:
    """float32 matmuls on ``device`` run in IEEE float32 (no TF32, no bf16 passes), by either of torch's APIs."""
    backend = {"cuda": torch.backends.cuda.matmul, "cpu": torch.backends.mkldnn.matmul}.get(device.type)
    precision = getattr(backend, "fp32_precision", "none")  # the new API; "none": not set, the legacy one decides
    if precision != "none":
        return precision == "ieee"
    try:
        if torch.get_float32_matmul_precision() != "highest":
            return False
        return not (device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:  # both APIs were used (torch refuses to answer): assume reduced precision
        return False


def exact_fused_dtype(weight: torch.Tensor, x: torch.Tensor, adapter_dtype: torch.dtype) -> bool:
    """The weight, the input and the adapter share float32 (full-precision matmuls) or float64, with no autocast."""
    dtype = weight.dtype
    if dtype not in _FUSED_DTYPES or x.dtype != dtype or adapter_dtype != dtype:
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    return dtype == torch.float64 or _full_precision_float32_matmul(x.device)

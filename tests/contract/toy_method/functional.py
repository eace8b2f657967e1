"""The toy's merge arithmetic, shared by the in-memory layer and the streaming rule (so they cannot drift)."""

from __future__ import annotations

import torch

from neuroada_plugin.kit.merge_checks import checked_finite


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, *, what: str) -> torch.Tensor:
    """``W + scale * a b^T`` computed in float32, returned in ``weight``'s dtype (NaN/inf refused)."""
    return checked_finite((weight.float() + scale * (a.float() @ b.float())).to(weight.dtype), what=what)

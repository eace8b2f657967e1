"""The one check every merge makes, in memory and streaming alike: nothing non-finite is ever written.

Torch only (a streaming merge rule imports it, and the merge CLI runs without PEFT or Transformers).
"""

from __future__ import annotations

import torch

from ..errors import MergeError

__all__ = ["checked_finite"]


def checked_finite(values: torch.Tensor, *, what: str, outcome: str = "Nothing was merged.") -> torch.Tensor:
    """``values`` (a merged weight, or merged entries), or :class:`MergeError` naming ``what`` if any is NaN/inf.

    ``what`` names the merge (``"NEAT adapter 'default' into layer X"``), ``outcome`` what was left unchanged.
    """
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        raise MergeError(
            f"Merging {what} would write {int((~finite).sum())} non-finite value(s) into a {values.dtype} weight "
            f"(the adapter holds NaN/inf or overflows the dtype). {outcome}"
        )
    return values

"""SAFE (selective adapter freezing): a training callback over any adapter, not an adapter type.

It lives beside the methods, not in the method registry: it schedules the training of whatever
adapter is trained (this package's methods or PEFT's LoRA). ``SAFEConfig`` and the math
(:mod:`.cka`, :mod:`.schedule`) import only torch; ``SAFECallback`` imports Transformers on first
access.
"""

from __future__ import annotations

from .._lazy import lazy_exports
from .cka import centered_gram, cka_from_grams, linear_cka
from .config import SAFEConfig
from .schedule import FreezeSchedule

__all__ = ["FreezeSchedule", "SAFECallback", "SAFEConfig", "centered_gram", "cka_from_grams", "linear_cka"]

__getattr__, __dir__ = lazy_exports(__name__, {"SAFECallback": "callback"}, needs_peft={"SAFECallback"})

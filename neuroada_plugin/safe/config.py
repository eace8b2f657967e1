"""SAFE's settings: one dataclass read by the callback, the Axolotl ``safe_*`` keys and the ``--safe_*`` flags.

Which values are the paper's and which are this package's reconstruction is said per field
(``metadata["help"]``) and in ``docs/safe.md``: the paper gives the two phases, CKA as the
importance measure and a cubic threshold schedule, but no hyper-parameter values and no code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from .schedule import FreezeSchedule

__all__ = ["SAFEConfig"]

Importance = Literal["disabled", "drift"]
Granularity = Literal["block", "module"]


@dataclass
class SAFEConfig:
    """Settings of :class:`~neuroada_plugin.SAFECallback`; step counts default to fractions of ``max_steps``."""

    warmup_ratio: float = field(
        default=0.1,
        metadata={
            "help": "Fraction of max_steps before any adapter may freeze (reconstructed default).",
            "ge": 0.0,
            "le": 1.0,
        },
    )
    warmup_steps: int | None = field(
        default=None, metadata={"help": "Warm-up length in steps; overrides warmup_ratio.", "ge": 0}
    )
    freeze_end_ratio: float = field(
        default=0.5,
        metadata={
            "help": "Fraction of max_steps at which the threshold reaches max_threshold and freezing stops "
            "(reconstructed default).",
            "ge": 0.0,
            "le": 1.0,
        },
    )
    freeze_end_steps: int | None = field(
        default=None, metadata={"help": "Schedule end in steps; overrides freeze_end_ratio.", "ge": 1}
    )
    max_threshold: float = field(
        default=0.5,
        metadata={
            "help": "Final threshold on relative importance (an adapter's score over the highest score): "
            "adapters below it are frozen (reconstructed default).",
            "ge": 0.0,
            "le": 1.0,
        },
    )
    check_every: int | None = field(
        default=None,
        metadata={"help": "Steps between importance checks; None: max(1, max_steps // 32).", "ge": 1},
    )
    importance: Importance = field(
        default="disabled",
        metadata={
            "help": "'disabled': 1 - CKA(layer output without the adapter, with it); 'drift': 1 - CKA(output "
            "now, output at the previous check). Both readings of the paper (reconstructed)."
        },
    )
    granularity: Granularity = field(
        default="block",
        metadata={
            "help": "'block': one unit per transformer block (all its adapted modules freeze together); "
            "'module': every adapted module is its own unit."
        },
    )
    max_frozen_fraction: float = field(
        default=0.75,
        metadata={
            "help": "At most this fraction of units is ever frozen (at least one always trains).",
            "ge": 0.0,
            "le": 1.0,
        },
    )
    freeze_from_input_only: bool = field(
        default=False,
        metadata={
            "help": "Freeze a unit only when every unit closer to the input is frozen, so that each freeze "
            "also stops autograd below it (largest memory saving, possibly a less important choice)."
        },
    )
    probe_rows: int = field(
        default=8, metadata={"help": "Rows of the first training batch kept as the fixed probe batch.", "ge": 1}
    )
    probe_tokens: int = field(
        default=256,
        metadata={"help": "Non-padding token positions per module used for CKA (evenly spaced).", "ge": 2},
    )

    def __post_init__(self) -> None:
        for name, allowed in (("importance", ("disabled", "drift")), ("granularity", ("block", "module"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"SAFE {name}={getattr(self, name)!r} is not one of {list(allowed)}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            low, high = f.metadata.get("ge"), f.metadata.get("le")
            if value is None or isinstance(value, str):
                continue
            kind = str(f.type).split(" |")[0]  # "int | None" -> "int"
            expected = {"bool": (bool,), "int": (int,), "float": (int, float)}[kind]
            if not isinstance(value, expected) or (kind != "bool" and isinstance(value, bool)):
                raise ValueError(f"SAFE {f.name} must be {kind}, got {value!r}")
            if (low is not None and value < low) or (high is not None and value > high):
                bounds = f"between {low} and {high}" if high is not None else f">= {low}"
                raise ValueError(f"SAFE {f.name}={value!r} must be {bounds}")
        if (
            self.warmup_steps is not None
            and self.freeze_end_steps is not None
            and self.freeze_end_steps <= self.warmup_steps
        ):
            raise ValueError(
                f"SAFE freeze_end_steps ({self.freeze_end_steps}) must be larger than warmup_steps ({self.warmup_steps})"
            )
        if self.warmup_steps is None and self.freeze_end_steps is None and self.freeze_end_ratio <= self.warmup_ratio:
            raise ValueError(
                f"SAFE freeze_end_ratio ({self.freeze_end_ratio}) must be larger than warmup_ratio ({self.warmup_ratio})"
            )

    def schedule(self, max_steps: int) -> FreezeSchedule:
        """The schedule for a run of ``max_steps`` optimizer steps (explicit step counts win over ratios)."""
        if max_steps < 2:
            raise ValueError(f"SAFE needs a run of at least 2 steps to warm up and freeze, got max_steps={max_steps}")
        warmup = self.warmup_steps if self.warmup_steps is not None else round(self.warmup_ratio * max_steps)
        end = self.freeze_end_steps if self.freeze_end_steps is not None else round(self.freeze_end_ratio * max_steps)
        end = max(end, warmup + 1)
        check_every = self.check_every if self.check_every is not None else max(1, max_steps // 32)
        return FreezeSchedule(
            warmup_steps=warmup, freeze_end_step=end, max_threshold=self.max_threshold, check_every=check_every
        )

"""The freezing threshold over training steps: zero during warm-up, then a cubic rise to its maximum.

``T(t) = T_max * (1 - (1 - (t - t_w) / (t_f - t_w))^3)`` for ``t_w <= t <= t_f``, 0 before
``t_w`` and ``T_max`` after ``t_f``. The cubic shape is the one SAFE's abstract names; the exact
formula is a reconstruction after AdaLoRA's budget schedule (see ``docs/safe.md``). It rises
fastest right after warm-up, so most freezing (and most of the saving) happens early.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FreezeSchedule"]


@dataclass(frozen=True)
class FreezeSchedule:
    """Steps resolved for one run: warm-up end ``t_w``, schedule end ``t_f``, check interval."""

    warmup_steps: int
    freeze_end_step: int
    max_threshold: float
    check_every: int

    def __post_init__(self) -> None:
        if self.warmup_steps < 0 or self.freeze_end_step <= self.warmup_steps:
            raise ValueError(
                f"the freezing schedule needs 0 <= warm-up end < schedule end, got warm-up end {self.warmup_steps} "
                f"and schedule end {self.freeze_end_step}"
            )
        if self.check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {self.check_every}")

    def threshold(self, step: int) -> float:
        """``T(step)``: the importance below which an adapter is frozen at ``step``."""
        if step <= self.warmup_steps:
            return 0.0
        if step >= self.freeze_end_step:
            return self.max_threshold
        progress = (step - self.warmup_steps) / (self.freeze_end_step - self.warmup_steps)
        return self.max_threshold * (1.0 - (1.0 - progress) ** 3)

    def is_check_step(self, step: int) -> bool:
        """Importance is measured every ``check_every`` steps, and at the last step of the schedule."""
        return (
            step > 0 and step <= self.freeze_end_step and (step % self.check_every == 0 or step == self.freeze_end_step)
        )

"""Configuration of the toy method: its one field; the targeting fields come from the kit's ``MethodConfig``."""

from __future__ import annotations

from dataclasses import dataclass, field

from neuroada_plugin.config_base import MethodConfig


@dataclass
class ToyRankConfig(MethodConfig):
    """A dense rank-1 update ``W + a b^T`` on each targeted linear layer (test-only)."""

    method_name = "toyrank"

    scale: float = field(default=1.0, metadata={"help": "Multiplies the update.", "ge": 0.0})

    def _validate(self) -> None:
        if self.target_modules is None:
            raise ValueError("ToyRankConfig.target_modules must be set (the toy has no architecture defaults).")

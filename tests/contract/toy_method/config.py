"""Configuration of the toy method."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig

from neuroada_plugin.peft_registration import ensure_peft_type


@dataclass
class ToyRankConfig(PeftConfig):
    """A dense rank-1 update ``W + a b^T`` on each targeted linear layer (test-only)."""

    target_modules: list[str] | str | None = field(default=None, metadata={"help": "Module names or regex to adapt."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Modules trained in full."})
    scale: float = field(default=1.0, metadata={"help": "Multiplies the update.", "ge": 0.0})
    init_weights: bool = field(default=True, metadata={"help": "Zero-initialise a (the model starts as the base)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type("toyrank")
        if self.target_modules is None:
            raise ValueError("ToyRankConfig.target_modules must be set (the toy has no architecture defaults).")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)

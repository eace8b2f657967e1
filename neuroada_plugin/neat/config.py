"""Configuration of NEAT (nonlinear weight-aware adaptation; PEFT ships the same method as PEANuT)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config_base import MethodConfig
from .functional import ACTIVATIONS


@dataclass
class NeatConfig(MethodConfig):
    """NEAT (Zhong et al., arXiv 2410.01870; PEFT's ``PeanutConfig``): ``dW = s * B @ act(A @ W0)``.

    Each targeted ``nn.Linear`` (weight ``W0: [out, in]``) learns a small network of its own
    frozen weight: ``A: [r, out]`` (Kaiming-uniform), ``B: [out, r]`` (zero when ``init_weights``)
    and, with ``depth = L > 0``, ``L`` residual encoder/decoder pairs of ``[r, r]`` matrices. The
    forward pass computes ``act(A @ W0)`` (``[r, in]``) once and never builds the dense update.
    Option names follow PEFT's PEANuT, so a ``PeanutConfig`` translates field by field.
    """

    method_name = "neat"

    r: int = field(
        default=8, metadata={"help": "NEAT rank: hidden size of the weight network (rank of dW <= r).", "ge": 1}
    )
    depth: int = field(
        default=0,
        metadata={
            "help": "Residual encoder/decoder pairs of [r, r] matrices between A and B (0: A and B only).",
            "ge": 0,
        },
    )
    act_fn: str = field(
        default="relu",
        metadata={"help": f"Activation of the weight network (ACT2FN names): one of {', '.join(sorted(ACTIVATIONS))}."},
    )
    scaling: float = field(default=1.0, metadata={"help": "Multiplier s of the update dW = s * B @ act(A @ W0)."})
    init_weights: bool = field(
        default=True,
        metadata={"help": "Zero-initialise B so the model starts as the base (True), or draw B at random (False)."},
    )

    def _validate(self) -> None:
        for name in ("r", "depth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"NeatConfig.{name} must be an integer, got {value!r}.")
        if self.r < 1:
            raise ValueError(f"NeatConfig.r must be >= 1 (the rank of the weight network), got {self.r}.")
        if self.depth < 0:
            raise ValueError(f"NeatConfig.depth must be >= 0 (residual pairs), got {self.depth}.")
        if self.act_fn not in ACTIVATIONS:
            raise ValueError(f"NeatConfig.act_fn must be one of {sorted(ACTIVATIONS)}, got {self.act_fn!r}.")
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)):
            raise ValueError(f"NeatConfig.scaling must be a number, got {self.scaling!r}.")
        self.scaling = float(self.scaling)
        if self.scaling != self.scaling or self.scaling in (float("inf"), float("-inf")):
            raise ValueError(f"NeatConfig.scaling must be finite, got {self.scaling!r}.")

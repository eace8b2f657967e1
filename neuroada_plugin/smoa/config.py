"""Configuration of SMoA (spectral block Hadamard-modulation adapter, Liu et al., arXiv 2601.07507 / 2605.21147)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config_base import MethodConfig
from .functional import block_ranks


@dataclass
class SmoaConfig(MethodConfig):
    """SMoA: ``dW[R_k, C_k] = (alpha / r) * (B_k @ A_k) * W0[R_k, C_k]`` on ``K`` aligned spectral blocks.

    Rows and columns of each targeted ``nn.Linear`` weight ``W0: [out, in]`` are sorted by their
    spectral centroid (one SVD when the adapter is created; the orderings are saved with the
    adapter and never recomputed) and cut into ``num_blocks`` groups. Each diagonal block gets a
    rank-``r_k`` factor pair modulating the frozen block element-wise, so the update's rank can
    far exceed ``r`` (with ``num_blocks=1`` it is PEFT's HiRA scaled by ``alpha / r``). Defaults are
    the authors' (``r=8``, ``num_blocks=2``, ``alpha=8``). Trainable entries per layer:
    ``sum_k r_k (|R_k| + |C_k|)``, about a LoRA of rank ``r / num_blocks``.
    """

    method_name = "smoa"

    r: int = field(default=8, metadata={"help": "Total rank, shared out over the blocks (sum of branch_ranks).", "ge": 1})
    num_blocks: int = field(
        default=2,
        metadata={"help": "Number K of spectral blocks (diagonal blocks that get an update); at most min(out, in).", "ge": 1},
    )
    alpha: float = field(default=8.0, metadata={"help": "Scale numerator: the update is multiplied by alpha / r."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input (0 <= dropout < 1)."})
    branch_ranks: list[int] | None = field(
        default=None,
        metadata={
            "help": "Rank of each block (num_blocks non-negative integers summing to r); None: r split evenly, "
            "first blocks larger."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "Zero B so the model starts as the base (True), or draw B at random like A (False)."},
    )

    def _validate(self) -> None:
        for name in ("r", "num_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"SmoaConfig.{name} must be an integer, got {value!r}.")
        if self.r < 1:
            raise ValueError(f"SmoaConfig.r must be >= 1 (the total rank), got {self.r}.")
        if self.num_blocks < 1:
            raise ValueError(f"SmoaConfig.num_blocks must be >= 1 (the number of spectral blocks), got {self.num_blocks}.")
        for name in ("alpha", "dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"SmoaConfig.{name} must be a finite number, got {value!r}.")
            setattr(self, name, float(value))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SmoaConfig.dropout must be in [0, 1), got {self.dropout}.")
        if self.branch_ranks is not None:
            ranks = self.branch_ranks
            if isinstance(ranks, (str, bytes)) or not hasattr(ranks, "__len__"):
                raise ValueError(f"SmoaConfig.branch_ranks must be a list of num_blocks integers, got {ranks!r}.")
            ranks = list(ranks)
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in ranks):
                raise ValueError(f"SmoaConfig.branch_ranks must hold non-negative integers, got {ranks}.")
            if len(ranks) != self.num_blocks:
                raise ValueError(
                    f"SmoaConfig.branch_ranks has {len(ranks)} entries but num_blocks={self.num_blocks}: give one rank "
                    "per block."
                )
            if sum(ranks) != self.r:
                raise ValueError(
                    f"SmoaConfig.branch_ranks {ranks} sum to {sum(ranks)}, but r={self.r}: the block ranks must sum to r "
                    f"(or leave branch_ranks unset to split r evenly)."
                )
            self.branch_ranks = ranks

    @property
    def ranks(self) -> list[int]:
        """The rank of each block."""
        return block_ranks(self.r, self.num_blocks, self.branch_ranks)

    @property
    def scaling(self) -> float:
        """``alpha / r``, the factor of every block's update."""
        return self.alpha / self.r

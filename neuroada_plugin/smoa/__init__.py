"""SMoA (Liu et al., arXiv 2601.07507 / 2605.21147): spectral block Hadamard-modulation adapter as a PEFT method.

``dW[R_k, C_k] = (alpha / r) * (B_k @ A_k) * W0[R_k, C_k]`` on ``K`` blocks of rows and columns ordered
by spectral centroid: a high-rank update from LoRA-sized factors, computed block by block in the
forward pass without keeping a weight-sized tensor, and merged exactly.

Importing this package only registers the method's spec (no PEFT, no torch). The classes are
loaded on first access (``from neuroada_plugin.smoa import SmoaConfig``).
"""

from __future__ import annotations

from .._lazy import lazy_exports
from ..registry import MethodSpec, register

__all__ = ["SmoaConfig", "SmoaLayer", "SmoaModel"]

register(
    MethodSpec(
        name="smoa",
        title="SMoA",
        config="neuroada_plugin.smoa.config:SmoaConfig",
        tuner="neuroada_plugin.smoa.model:SmoaModel",
        checkpoint_rule="neuroada_plugin.smoa.checkpoint:smoa_checkpoint_rule",
        summary="SMoA: dW[R_k, C_k] = (alpha/r) * (B_k @ A_k) * W0[R_k, C_k] on K spectral blocks (high rank, exact merge).",
        needs_float_weights=True,
        reads_weights_when_created=True,
        reads_weights_in_forward=True,
        exact_merge=True,
        supports_sharding=False,
    )
)

_LAZY = {"SmoaConfig": "config", "SmoaLayer": "layer", "SmoaModel": "model"}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, needs_peft=set(_LAZY))

"""NEAT (Zhong et al., arXiv 2410.01870; PEFT's PEANuT): nonlinear weight-aware adaptation as a PEFT method.

``dW = s * B @ act(A @ W0)`` learned as a small network of the frozen weight, computed in the
forward pass as ``s * B @ (act(A @ W0) @ x)`` without building a weight-sized tensor.

Importing this package only registers the method's spec (no PEFT, no torch). The classes are
loaded on first access (``from neuroada_plugin.neat import NeatConfig``).
"""

from __future__ import annotations

from .._lazy import lazy_exports
from ..registry import MethodSpec, register

__all__ = ["NeatConfig", "NeatLayer", "NeatModel"]

register(
    MethodSpec(
        name="neat",
        title="NEAT",
        config="neuroada_plugin.neat.config:NeatConfig",
        tuner="neuroada_plugin.neat.model:NeatModel",
        checkpoint_rule="neuroada_plugin.neat.checkpoint:neat_checkpoint_rule",
        summary="NEAT (= PEFT's PEANuT): dW = s * B @ act(A @ W0), a small network of the frozen weight (exact merge).",
        needs_float_weights=True,
        reads_weights_when_created=False,
        reads_weights_in_forward=True,
        exact_merge=True,
        quantized_layers=("bnb_4bit", "bnb_8bit"),  # W0 dequantized one layer at a time, in forward and backward
        supports_sharding=True,  # W0 gathered under ZeRO-3 for each read, in forward and in backward (kit)
        cli_commands=("neuroada_plugin.neat.cli:register",),
        exports_lora=True,
    )
)

_LAZY = {"NeatConfig": "config", "NeatLayer": "layer", "NeatModel": "model"}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, needs_peft=set(_LAZY))

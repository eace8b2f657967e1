"""NeuroAda (Zhang et al., 2025): per-neuron top-k sparse fine-tuning as a PEFT method.

Importing this package only registers the method's spec (no PEFT, no torch). The classes are
loaded on first access (``from neuroada_plugin.neuroada import NeuroAdaConfig``).
"""

from __future__ import annotations

from .._lazy import lazy_exports
from ..registry import MethodSpec, register

__all__ = ["Linear", "NeuroAdaConfig", "NeuroAdaLayer", "NeuroAdaModel", "select_connections"]

register(
    MethodSpec(
        name="neuroada",
        config="neuroada_plugin.neuroada.config:NeuroAdaConfig",
        tuner="neuroada_plugin.neuroada.model:NeuroAdaModel",
        checkpoint_rule="neuroada_plugin.neuroada.checkpoint:neuroada_checkpoint_rule",
        summary="NeuroAda: train the top-k input connections of every output neuron as a sparse bypass (exact merge).",
        needs_float_weights=True,
        reads_weights_when_created=True,
        exact_merge=True,
        quantized_layers=("bnb_4bit", "bnb_8bit"),
        supports_sharding=True,
    )
)

_LAZY = {
    "NeuroAdaConfig": "config",
    "NeuroAdaLayer": "layer",
    "Linear": "layer",
    "NeuroAdaModel": "model",
    "select_connections": "selection",
}
__getattr__, __dir__ = lazy_exports(
    __name__, _LAZY, needs_peft={"NeuroAdaConfig", "NeuroAdaLayer", "Linear", "NeuroAdaModel"}
)

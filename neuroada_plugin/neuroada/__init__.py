"""NeuroAda (Zhang et al., 2025): per-neuron top-k sparse fine-tuning as a PEFT method.

Importing this package only registers the method's spec (no PEFT, no torch). The classes are
loaded on first access (``from neuroada_plugin.neuroada import NeuroAdaConfig``).
"""

from __future__ import annotations

import importlib
from typing import Any

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

# name -> (submodule, needs PEFT)
_LAZY = {
    "NeuroAdaConfig": ("config", True),
    "NeuroAdaLayer": ("layer", True),
    "Linear": ("layer", True),
    "NeuroAdaModel": ("model", True),
    "select_connections": ("selection", False),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    submodule, needs_peft = _LAZY[name]
    if needs_peft:
        # Import PEFT first, on its own: the start-up hook registers the methods while none of
        # this package's PEFT-dependent modules is half-imported.
        import peft  # noqa: F401
    value = getattr(importlib.import_module(f"{__name__}.{submodule}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})

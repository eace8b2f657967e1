"""NEAT tuner: wraps the targeted linear layers in :class:`~.layer.NeatLayer` (targets checked by the kit)."""

from __future__ import annotations

from torch import nn

from ..kit.tuner import MethodTuner
from .config import NeatConfig
from .layer import NeatLayer


class NeatModel(MethodTuner):
    """PEFT tuner for NEAT. Create it through ``peft.get_peft_model(model, NeatConfig())``."""

    method_name = "neat"
    tuner_layer_cls = NeatLayer

    def create_layer(self, target: nn.Module, adapter_name: str, config: NeatConfig, module_name: str) -> NeatLayer:
        return NeatLayer(target, adapter_name, config, module_name=module_name)

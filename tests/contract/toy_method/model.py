"""The toy's tuner: which layer wraps a target; the kit does the rest."""

from __future__ import annotations

from torch import nn

from neuroada_plugin.kit.tuner import MethodTuner

from .config import ToyRankConfig
from .layer import ToyRankLayer


class ToyRankModel(MethodTuner):
    method_name = "toyrank"
    tuner_layer_cls = ToyRankLayer
    target_module_mapping: dict = {}

    def create_layer(
        self, target: nn.Module, adapter_name: str, config: ToyRankConfig, module_name: str
    ) -> ToyRankLayer:
        return ToyRankLayer(target, adapter_name, config, module_name=module_name)

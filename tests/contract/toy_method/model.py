"""The toy's tuner."""

from __future__ import annotations

from torch import nn

from neuroada_plugin.tuner_base import ParameterDictTuner

from .layer import ToyRankLayer


class ToyRankModel(ParameterDictTuner):
    prefix: str = "toyrank_"
    tuner_layer_cls = ToyRankLayer
    target_module_mapping: dict = {}

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs) -> None:
        if isinstance(target, ToyRankLayer):
            target.update_layer(adapter_name, config)
            return
        if not isinstance(target, nn.Linear):
            raise TypeError(f"toyrank adapts nn.Linear only, not {current_key} ({type(target).__name__}).")
        new_module = ToyRankLayer(target, adapter_name, config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

"""A second toy method that has no streaming merge rule: the kit and the contract need none.

It is the toy with another name (so another PEFT type, prefix and tensors); its spec names no
``checkpoint_rule``, so ``neuroada-plugin merge`` refuses its adapters with the way to merge them.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .config import ToyRankConfig
from .layer import ToyRankLayer
from .model import ToyRankModel


@dataclass
class ToyPlainConfig(ToyRankConfig):
    method_name = "toyplain"


class ToyPlainLayer(ToyRankLayer):
    method_name = "toyplain"


class ToyPlainModel(ToyRankModel):
    method_name = "toyplain"
    tuner_layer_cls = ToyPlainLayer

    def create_layer(self, target: nn.Module, adapter_name: str, config: ToyPlainConfig, module_name: str):
        return ToyPlainLayer(target, adapter_name, config, module_name=module_name)

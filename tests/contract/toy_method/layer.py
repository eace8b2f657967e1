"""The toy's tuner layer: ``y = base(x) + scale * (x b^T) a^T``."""

from __future__ import annotations

import zlib
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .config import ToyRankConfig
from .functional import merged_weight


class ToyRankLayer(nn.Module, BaseTunerLayer):
    adapter_layer_names = ("toyrank_a", "toyrank_b")
    other_param_names = ("toyrank_scale",)

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config: ToyRankConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.toyrank_a = nn.ParameterDict({})
        self.toyrank_b = nn.ParameterDict({})
        self.toyrank_scale: dict[str, float] = {}
        self._backup: dict[str, torch.Tensor] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.out_features, self.in_features = base_layer.weight.shape
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: ToyRankConfig) -> None:
        weight = self.get_base_layer().weight
        generator = torch.Generator().manual_seed(zlib.crc32(adapter_name.encode()))
        b = 0.1 * torch.randn(1, self.in_features, generator=generator)
        a = torch.zeros(self.out_features, 1) if config.init_weights else 0.1 * torch.randn(self.out_features, 1)
        self.toyrank_a[adapter_name] = nn.Parameter(a.to(weight.device, weight.dtype))
        self.toyrank_b[adapter_name] = nn.Parameter(b.to(weight.device, weight.dtype))
        self.toyrank_scale[adapter_name] = config.scale
        self.set_adapter(self.active_adapters)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, b = self.toyrank_a[adapter_name], self.toyrank_b[adapter_name]
        return self.toyrank_scale[adapter_name] * (a @ b)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        weight = self.get_base_layer().weight
        for name in check_adapters_to_merge(self, adapter_names):
            if name in self.toyrank_a:
                self._backup[name] = weight.data.clone()
                a, b = self.toyrank_a[name].detach(), self.toyrank_b[name].detach()
                weight.data = merged_weight(weight.data, a, b, self.toyrank_scale[name])
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            weight.data = self._backup.pop(self.merged_adapters.pop())

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name in self.toyrank_a:
                a, b = self.toyrank_a[name], self.toyrank_b[name]
                result = result + (self.toyrank_scale[name] * (x.to(a.dtype) @ b.T) @ a.T).to(result.dtype)
        return result

"""The toy's tuner layer: ``y = base(x) + scale * (x b^T) a^T``; only its delta and merge arithmetic."""

from __future__ import annotations

import zlib

import torch
from torch import nn

from neuroada_plugin.kit.layer import MethodLayer

from .config import ToyRankConfig
from .functional import merged_weight


class ToyRankLayer(MethodLayer):
    """Its tensors are named after ``method_name`` (``toyrank_a``...), so a subclass is another method."""

    method_name = "toyrank"
    adapter_layer_names = ("toyrank_a", "toyrank_b")
    other_param_names = ("toyrank_scale", "toyrank_fingerprint")

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.method_name
        cls.adapter_layer_names = (f"{name}_a", f"{name}_b")
        cls.other_param_names = (f"{name}_scale", f"{name}_fingerprint")

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config: ToyRankConfig, module_name: str = "") -> None:
        super().__init__(base_layer)
        setattr(self, self.adapter_layer_names[0], nn.ParameterDict({}))
        setattr(self, self.adapter_layer_names[1], nn.ParameterDict({}))
        setattr(self, self.other_param_names[0], {})
        self._backup: dict[str, torch.Tensor] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name=module_name)

    def update_layer(self, adapter_name: str, config: ToyRankConfig, module_name: str = "") -> None:
        weight = self.get_base_layer().weight
        generator = torch.Generator().manual_seed(zlib.crc32(adapter_name.encode()))
        b = 0.1 * torch.randn(1, self.in_features, generator=generator)
        a = torch.zeros(self.out_features, 1) if config.init_weights else 0.1 * torch.randn(self.out_features, 1)
        self._a[adapter_name] = nn.Parameter(a.to(weight.device, weight.dtype))
        self._b[adapter_name] = nn.Parameter(b.to(weight.device, weight.dtype))
        self._scale[adapter_name] = config.scale
        self.record_fingerprint(adapter_name, config)
        self.set_adapter(self.active_adapters)

    @property
    def _a(self) -> nn.ParameterDict:
        return getattr(self, self.adapter_layer_names[0])

    @property
    def _b(self) -> nn.ParameterDict:
        return getattr(self, self.adapter_layer_names[1])

    @property
    def _scale(self) -> dict[str, float]:
        return getattr(self, self.other_param_names[0])

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, b = self._a[adapter_name], self._b[adapter_name]
        return self._scale[adapter_name] * (a @ b)

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        a, b = self._a[adapter_name], self._b[adapter_name]
        return self._scale[adapter_name] * (x.to(a.dtype) @ b.T) @ a.T

    def _merged(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self._a[name].detach(), self._b[name].detach()
        return merged_weight(weight, a, b, self._scale[name], what=f"{self.method_name} adapter {name!r}")

    def check_merge_values(self, adapter_names: list[str]) -> None:
        weight = self.get_base_layer().weight.data
        for name in adapter_names:
            weight = self._merged(weight, name)

    def merge_into_weight(self, adapter_names: list[str]) -> None:
        weight = self.get_base_layer().weight
        steps = [weight.data]
        for name in adapter_names:  # computed (and checked) before the weight changes
            steps.append(self._merged(steps[-1], name))
        for name, before in zip(adapter_names, steps, strict=False):
            self._backup[name] = before.clone()
        weight.data = steps[-1]
        self.merged_adapters.extend(adapter_names)

    def unmerge_from_weight(self) -> None:
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            weight.data = self._backup.pop(self.merged_adapters.pop())

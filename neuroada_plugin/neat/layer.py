"""NEAT tuner layer: ``y = base(x) + s * B @ (act(A @ W0) @ x)``, never building an ``[out, in]`` tensor."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from ..kit.layer import WeightFunctionLayer
from ..kit.quantized import bnb_layer_kind
from ..kit.sharded import gathered, is_partitioned
from .config import NeatConfig
from .functional import delta_weight, merged_weight, neat_delta, weight_features


class NeatLayer(WeightFunctionLayer):
    """Wraps one ``nn.Linear``; adapter tensors per adapter name: ``neat_A [r, out]``, ``neat_B [out, r]`` and,
    when ``depth > 0``, ``neat_E`` / ``neat_D [depth, r, r]`` (encoder and decoder matrices, stacked)."""

    method_name = "neat"
    adapter_layer_names = ("neat_A", "neat_B", "neat_E", "neat_D")
    other_param_names = ("neat_r", "neat_depth", "neat_act_fn", "neat_scaling", "neat_fingerprint")

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config: NeatConfig, module_name: str = "") -> None:
        super().__init__(base_layer)
        self.neat_A = nn.ParameterDict({})
        self.neat_B = nn.ParameterDict({})
        self.neat_E = nn.ParameterDict({})
        self.neat_D = nn.ParameterDict({})
        self.neat_r: dict[str, int] = {}
        self.neat_depth: dict[str, int] = {}
        self.neat_act_fn: dict[str, str] = {}
        self.neat_scaling: dict[str, float] = {}
        self._module_name = module_name
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name=module_name)

    def update_layer(self, adapter_name: str, config: NeatConfig, module_name: str = "") -> None:
        weight = self.get_base_layer().weight
        dtype = self.adapter_init_dtype()  # float32 on a quantized base
        r, depth = config.r, config.depth

        def kaiming(*shape: int) -> torch.Tensor:
            tensor = torch.empty(shape)
            nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))  # nn.Linear's default, as PEANuT
            return tensor

        a = kaiming(r, self.out_features)
        b = torch.zeros(self.out_features, r) if config.init_weights else kaiming(self.out_features, r)
        self.neat_A[adapter_name] = nn.Parameter(a.to(weight.device, dtype))
        self.neat_B[adapter_name] = nn.Parameter(b.to(weight.device, dtype))
        if depth > 0:
            self.neat_E[adapter_name] = nn.Parameter(
                torch.stack([kaiming(r, r) for _ in range(depth)]).to(weight.device, dtype)
            )
            self.neat_D[adapter_name] = nn.Parameter(
                torch.stack([kaiming(r, r) for _ in range(depth)]).to(weight.device, dtype)
            )
        self.neat_r[adapter_name] = r
        self.neat_depth[adapter_name] = depth
        self.neat_act_fn[adapter_name] = config.act_fn
        self.neat_scaling[adapter_name] = config.scaling
        self.record_fingerprint(adapter_name, config)
        self.set_adapter(self.active_adapters)

    def _tensors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        return self.neat_A[name], self.neat_B[name], self.neat_E.get(name), self.neat_D.get(name)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense update of ``adapter_name`` from the pre-merge weight (float32; for inspection and merging)."""
        a, b, enc, dec = self._tensors(adapter_name)
        act, scaling = self.neat_act_fn[adapter_name], self.neat_scaling[adapter_name]
        with gathered([a, b, enc, dec]), self.read_pre_merge_weight() as original:
            return delta_weight(self.trained_against(original, adapter_name), a, b, enc, dec, act, scaling)

    def merged_weight(self, current: torch.Tensor, original: torch.Tensor, adapter_name: str) -> torch.Tensor:
        a, b, enc, dec = self._tensors(adapter_name)
        what = f"NEAT adapter {adapter_name!r} into layer {self.layer_name()}"
        act, scaling = self.neat_act_fn[adapter_name], self.neat_scaling[adapter_name]
        return merged_weight(current, original, a, b, enc, dec, act, scaling, what=what)

    def check_weight_for_forward(self) -> None:
        base = self.get_base_layer()
        weight = base.weight
        # read_weight gathers a ZeRO-3 partition and dequantizes a bitsandbytes layer; any other shard cannot be read.
        readable = is_partitioned(weight) or bnb_layer_kind(base) is not None
        if weight.shape != (self.out_features, self.in_features) and not readable:
            raise RuntimeError(
                f"NEAT layer ({self.out_features}x{self.in_features}) sees its frozen weight as a "
                f"{tuple(weight.shape)} shard in the forward pass, which it cannot gather (not a DeepSpeed ZeRO-3 "
                "partition); NEAT reads the whole weight every step. Use DeepSpeed ZeRO, DDP or FSDP."
            )

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        a, b, enc, dec = self._tensors(adapter_name)
        # [r, in], once per forward; W0 read through the kit (gathered under ZeRO-3) in forward and backward.
        reader = functools.partial(self.read_trained_weight, adapter_name)
        features = weight_features(reader, a, enc, dec, self.neat_act_fn[adapter_name])
        return neat_delta(x, features, b, self.neat_scaling[adapter_name])

    def __repr__(self) -> str:
        return "neat." + super().__repr__()

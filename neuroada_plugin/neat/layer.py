"""NEAT tuner layer: ``y = base(x) + s * B @ (act(A @ W0) @ x)``, never building an ``[out, in]`` tensor."""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..kit.fingerprint import check_loaded_fingerprints, not_recorded, readable_here, weight_fingerprint
from .config import NeatConfig
from .functional import delta_weight, merged_weight, neat_delta, weight_features


class NeatLayer(nn.Module, BaseTunerLayer):
    """Wraps one ``nn.Linear``; adapter tensors per adapter name: ``neat_A [r, out]``, ``neat_B [out, r]`` and,
    when ``depth > 0``, ``neat_E`` / ``neat_D [depth, r, r]`` (encoder and decoder matrices, stacked)."""

    adapter_layer_names = ("neat_A", "neat_B", "neat_E", "neat_D")
    other_param_names = ("neat_r", "neat_depth", "neat_act_fn", "neat_scaling", "neat_fingerprint")

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config: NeatConfig) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.neat_A = nn.ParameterDict({})
        self.neat_B = nn.ParameterDict({})
        self.neat_E = nn.ParameterDict({})
        self.neat_D = nn.ParameterDict({})
        self.neat_r: dict[str, int] = {}
        self.neat_depth: dict[str, int] = {}
        self.neat_act_fn: dict[str, str] = {}
        self.neat_scaling: dict[str, float] = {}
        # Per adapter, the fingerprint of the base weight it was created on (kit/fingerprint.py).
        self.neat_fingerprint = BufferDict({}, persistent=True)
        # The weight before the first merge: every merged adapter's update is a function of it,
        # and unmerge restores it bit for bit.
        self._original_weight: torch.Tensor | None = None
        self._disable_adapters = False
        self.merged_adapters = []
        self.out_features, self.in_features = base_layer.weight.shape
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: NeatConfig) -> None:
        weight = self.get_base_layer().weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
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
        if weight.is_meta or config.inference_mode:  # loading: the file brings it (or is older than fingerprints)
            fingerprint = not_recorded().to(weight.device)
        else:
            fingerprint = weight_fingerprint(weight).to(weight.device)
        self.neat_fingerprint[adapter_name] = fingerprint
        self.set_adapter(self.active_adapters)

    def _tensors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        return self.neat_A[name], self.neat_B[name], self.neat_E.get(name), self.neat_D.get(name)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense update of ``adapter_name`` from the pre-merge weight (float32; for inspection and merging)."""
        original = self._original_weight if self._original_weight is not None else self.get_base_layer().weight
        a, b, enc, dec = self._tensors(adapter_name)
        return delta_weight(original, a, b, enc, dec, self.neat_act_fn[adapter_name], self.neat_scaling[adapter_name])

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        weight = self.get_base_layer().weight
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.neat_A:
                continue
            if self._original_weight is None:
                self._original_weight = weight.data.clone()
            a, b, enc, dec = self._tensors(name)
            with torch.no_grad():
                weight.data = merged_weight(
                    weight.data, self._original_weight, a, b, enc, dec, self.neat_act_fn[name], self.neat_scaling[name]
                )
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self.get_base_layer().weight.data = self._original_weight
        self._original_weight = None
        self.merged_adapters.clear()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        weight = self.get_base_layer().weight
        if weight.shape != (self.out_features, self.in_features):
            raise RuntimeError(
                f"NEAT layer ({self.out_features}x{self.in_features}) sees its frozen weight as a "
                f"{tuple(weight.shape)} shard in the forward pass (DeepSpeed ZeRO-3 gathers it only inside the base "
                "layer's own forward); NEAT reads the whole weight every step. Use ZeRO-1/2, DDP or FSDP."
            )
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name not in self.neat_A:
                continue
            a, b, enc, dec = self._tensors(name)
            features = weight_features(weight, a, enc, dec, self.neat_act_fn[name])  # [r, in], once per forward
            result = result + neat_delta(x, features, b, self.neat_scaling[name]).to(result.dtype)
        return result

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        weight = self.get_base_layer().weight
        layer = prefix.removeprefix("base_model.model.").rstrip(".")
        check_loaded_fingerprints(
            self,
            state_dict,
            prefix,
            adapter_key="neat_A",
            fingerprint_key="neat_fingerprint",
            read_weight=(lambda: nullcontext(weight)) if readable_here(weight) else None,
            where=f"NEAT layer {layer}",
        )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def __repr__(self) -> str:
        return "neat." + super().__repr__()

"""SMoA tuner: wraps the targeted linear layers in :class:`~.layer.SmoaLayer` (targets checked by the kit)."""

from __future__ import annotations

from torch import nn

from ..kit.layer import layer_shape
from ..kit.tuner import MethodTuner
from .config import SmoaConfig
from .layer import SmoaLayer


class SmoaModel(MethodTuner):
    """PEFT tuner for SMoA. Create it through ``peft.get_peft_model(model, SmoaConfig())``."""

    method_name = "smoa"
    tuner_layer_cls = SmoaLayer

    def create_layer(self, target: nn.Module, adapter_name: str, config: SmoaConfig, module_name: str) -> SmoaLayer:
        return SmoaLayer(target, adapter_name, config, module_name=module_name)

    def check_target_fits(self, config: SmoaConfig, target: nn.Module, module_name: str, in_features: int) -> None:
        base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
        out_features, _ = layer_shape(base)
        smallest = min(out_features, in_features)
        if config.num_blocks > smallest:
            raise ValueError(
                f"SMoA num_blocks={config.num_blocks} exceeds layer {module_name}'s smaller side ({smallest}; weight "
                f"shape {[out_features, in_features]}): every block needs at least one row and one column. Lower "
                "num_blocks or exclude this layer."
            )

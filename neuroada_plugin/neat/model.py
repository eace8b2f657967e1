"""NEAT tuner: finds the target linear layers and wraps them in :class:`~.layer.NeatLayer`."""

from __future__ import annotations

from torch import nn

from ..config_base import DEFAULT_TARGET_MODULES
from ..errors import UnsupportedTargetError
from ..tuner_base import ParameterDictTuner
from .config import NeatConfig
from .layer import NeatLayer


class NeatModel(ParameterDictTuner):
    """PEFT tuner for NEAT. Create it through ``peft.get_peft_model(model, NeatConfig())``.

    Adapts ``torch.nn.Linear`` layers with a floating-point weight; other module types (GPT-2
    ``Conv1D``, quantized layers) are rejected with an error naming the module.
    """

    prefix: str = "neat_"
    tuner_layer_cls = NeatLayer
    target_module_mapping = DEFAULT_TARGET_MODULES

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs) -> None:
        if isinstance(target, NeatLayer):
            target.update_layer(adapter_name, config)
            return
        if type(target) is not nn.Linear or not target.weight.is_floating_point():
            raise UnsupportedTargetError(
                f"NEAT adapts torch.nn.Linear layers with a floating-point weight only; {current_key} is a "
                f"{type(target).__name__}. Exclude it (exclude_modules) or choose other target_modules."
            )
        if target.weight.dim() != 2:  # a DeepSpeed ZeRO-3 partition (flat, often empty)
            raise UnsupportedTargetError(
                f"NEAT cannot adapt {current_key}: its weight is a {tuple(target.weight.shape)} shard (DeepSpeed "
                "ZeRO-3?), and NEAT reads the whole frozen weight in every forward. Use ZeRO-1/2, DDP or FSDP."
            )
        new_module = NeatLayer(target, adapter_name, config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _check_new_adapter_config(self, config: NeatConfig) -> None:
        super()._check_new_adapter_config(config)
        if not isinstance(config, NeatConfig):
            raise TypeError(f"NeatModel needs a NeatConfig, got {type(config).__name__}.")

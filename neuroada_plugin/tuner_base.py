"""The PEFT tuner base every method of this package derives from.

PEFT's ``BaseTuner`` assumes adapter tensors live inside ``nn.Module`` containers (LoRA's
``lora_A[name]`` is an ``nn.Linear``). This package's methods keep them in ``nn.ParameterDict``
(one tensor per adapter, no module overhead), where PEFT's generic code misbehaves once:
``_cast_adapter_dtype`` (run by ``get_peft_model``, ``add_adapter``, ``from_pretrained`` and
``load_adapter``) assigns ``ParameterDict[name] = tensor.to(float32)``, which wraps the tensor
in a *new* ``Parameter`` with ``requires_grad=True``: a frozen, inactive or inference-only adapter
would silently become trainable. :class:`ParameterDictTuner` restores every flag after the cast.

It also raises, after a load, the base-fingerprint mismatches its layers noted
(:mod:`neuroada_plugin.kit.fingerprint`), and guards the model's bitsandbytes 4-bit layers against bitsandbytes' CPU-packed layout
(:mod:`neuroada_plugin.kit.bnb_cpu_layout`) while the adapter is attached, targeted or not: a gradient
through any frozen 4-bit layer reaches the adapters below it, and saving must not corrupt any.
"""

from __future__ import annotations

from typing import Any

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .kit.bnb_cpu_layout import guard_4bit_layers, unguard_4bit_layers
from .kit.fingerprint import raise_pending_mismatches

__all__ = ["ParameterDictTuner"]


class ParameterDictTuner(BaseTuner):
    """``BaseTuner`` for methods whose layers keep adapter tensors in ``nn.ParameterDict`` attributes
    (named by the layer's ``adapter_layer_names``): PEFT's dtype cast keeps each tensor's ``requires_grad``."""

    def _post_injection_hook(self, model: nn.Module, config: Any, adapter_name: str) -> None:
        super()._post_injection_hook(model, config, adapter_name)
        guard_4bit_layers(model)
        if not getattr(self, "_checks_base_fingerprints", False):
            # Layers note a loaded adapter whose base fingerprint differs; one error once the load is complete.
            self.register_load_state_dict_post_hook(lambda module, incompatible: raise_pending_mismatches(module))
            self._checks_base_fingerprints = True

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        unguard_4bit_layers(model)  # the plain model goes back in bitsandbytes' standard layout, unhooked
        return model

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        flags = [
            (container, container[adapter_name].requires_grad) for container in self._adapter_containers(adapter_name)
        ]
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        for container, requires_grad in flags:
            container[adapter_name].requires_grad_(requires_grad)

    def _adapter_containers(self, adapter_name: str) -> list[nn.ParameterDict]:
        """Every ``ParameterDict`` of a tuner layer that holds a tensor of ``adapter_name``."""
        containers = []
        for module in self.model.modules():
            if not isinstance(module, BaseTunerLayer):
                continue
            for attribute in module.adapter_layer_names:
                container = getattr(module, attribute, None)
                if isinstance(container, nn.ParameterDict) and adapter_name in container:
                    containers.append(container)
        return containers

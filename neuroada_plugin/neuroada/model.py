"""NeuroAda tuner: which layer wraps a target, NeuroAda's own limit (``top_k``), and its saved state."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import AdapterCheckpointError
from ..kit.tuner import MethodTuner
from .bnb import dispatch_bnb
from .config import NeuroAdaConfig
from .layer import Linear, NeuroAdaLayer


class NeuroAdaModel(MethodTuner):
    """PEFT tuner for NeuroAda. Create it through ``peft.get_peft_model(model, NeuroAdaConfig())``.

    ``torch.nn.Linear`` layers with a floating-point weight and bitsandbytes ``Linear4bit`` /
    ``Linear8bitLt`` layers (QLoRA-style, :mod:`.bnb`) are adapted; what else is refused, and how,
    follows from the method's spec (:mod:`neuroada_plugin.kit.tuner`).
    """

    method_name = "neuroada"
    tuner_layer_cls = NeuroAdaLayer

    def create_layer(self, target: nn.Module, adapter_name: str, config: NeuroAdaConfig, module_name: str) -> nn.Module:
        # bitsandbytes layers get their quantized variant (the base layer's own quantized forward + the bypass).
        layer = dispatch_bnb(target, adapter_name, config, module_name=module_name)
        return layer if layer is not None else Linear(target, adapter_name, config, module_name=module_name)

    def check_target_fits(self, config: NeuroAdaConfig, target: nn.Module, module_name: str, in_features: int) -> None:
        if config.top_k > in_features:
            raise ValueError(
                f"top_k={config.top_k} exceeds in_features={in_features} of layer {module_name}; lower top_k or "
                "exclude this layer."
            )

    @classmethod
    def _get_adapter_state_dict(cls, model: nn.Module, *args: Any, **kwargs: Any):
        """Run deferred selections before saving, so a file never holds placeholder indices."""
        pending = [m for m in model.modules() if isinstance(m, NeuroAdaLayer) and m._pending_selection]
        if pending:
            for module in pending:
                module._resolve_pending_selection()
            fresh = model.state_dict()
            kwargs["state_dict"] = {key: fresh.get(key, value) for key, value in kwargs["state_dict"].items()}
        result = super()._get_adapter_state_dict(model, *args, **kwargs)
        _check_complete(result)
        return result

    def _pin_adapter_dtype(self, adapter_name: str) -> None:
        """After PEFT's cast (bf16/fp16 adapters upcast to float32 unless ``autocast_adapter_dtype=False``), a theta
        pinned by ``config.theta_dtype`` gets that dtype back."""
        pinned = self.peft_config[adapter_name].torch_theta_dtype
        if pinned is None:
            return
        for layer in self.model.modules():
            if isinstance(layer, NeuroAdaLayer) and adapter_name in layer.neuroada_theta:
                theta = layer.neuroada_theta[adapter_name]
                if theta.dtype != pinned:  # bf16/fp16 -> fp32 -> back: exact
                    layer.neuroada_theta[adapter_name] = nn.Parameter(
                        theta.detach().to(pinned), requires_grad=theta.requires_grad
                    )


def _check_complete(state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse to save an adapter whose tensors are ZeRO-3 partitions (0 or a slice of the elements).

    ``model.state_dict()`` of a ZeRO-3 model holds each rank's partition, not the values; saving it
    would write an empty adapter silently (a known failure of PEFT methods after ZeRO-3 runs).
    """
    bad = [
        key
        for key, value in state_dict.items()
        if (".neuroada_theta." in key or ".neuroada_indices." in key) and (value.dim() != 2 or value.numel() == 0)
    ]
    if bad:
        raise AdapterCheckpointError(
            f"NeuroAda adapter state holds {len(bad)} partitioned (empty or flattened) tensor(s), e.g. {bad[0]}: the "
            "model is sharded with DeepSpeed ZeRO-3. Save the consolidated state instead, gathered on every rank: "
            "model.save_pretrained(dir, state_dict=engine._zero3_consolidated_16bit_state_dict()) (Trainer, TRL and "
            "Axolotl do this when `stage3_gather_16bit_weights_on_model_save` is true)."
        )

"""NeuroAda tuner: finds the target linear layers and wraps them in :class:`~.layer.Linear`."""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..config_base import DEFAULT_TARGET_MODULES
from ..errors import AdapterCheckpointError, UnsupportedTargetError
from ..kit.quantized import SUPPORTED_QUANTIZED_LAYERS, bnb_layer_kind
from ..tuner_base import ParameterDictTuner
from .bnb import dispatch_bnb
from .config import NeuroAdaConfig
from .layer import Linear, NeuroAdaLayer


class NeuroAdaModel(ParameterDictTuner):
    """PEFT tuner for NeuroAda. Create it through ``peft.get_peft_model(model, NeuroAdaConfig())``.

    ``torch.nn.Linear`` layers with a floating-point weight and bitsandbytes ``Linear4bit`` /
    ``Linear8bitLt`` layers (QLoRA-style, :mod:`.bnb`) are adapted; GPT-2 style ``Conv1D``, other
    quantized layers (GPTQ, AWQ, HQQ, torchao, ...) and other module types are rejected with
    :class:`~neuroada_plugin.errors.UnsupportedTargetError` naming the module.
    """

    prefix: str = "neuroada_"
    tuner_layer_cls = NeuroAdaLayer
    target_module_mapping = DEFAULT_TARGET_MODULES

    def _create_and_replace(
        self,
        peft_config: NeuroAdaConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        if isinstance(target, NeuroAdaLayer):
            target.update_layer(adapter_name, peft_config, module_name=current_key)
            return
        check_supported_target(target, current_key)
        # bitsandbytes layers get their quantized variant (the base layer's own quantized forward + the bypass).
        new_module = dispatch_bnb(target, adapter_name, peft_config, module_name=current_key)
        if new_module is None:
            new_module = Linear(target, adapter_name, peft_config, module_name=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        setattr(parent, child_name, new_module)
        if hasattr(child, "base_layer"):
            child = child.base_layer
        # Adapter tensors live on the base layer's device (never on meta when it is real).
        for name, module in new_module.named_modules():
            if self.prefix in name and hasattr(module, "to"):
                weight = getattr(child, "weight", None)
                if weight is not None and not weight.is_meta:
                    if any(p.is_meta for p in module.parameters()) or any(b.is_meta for b in module.buffers()):
                        continue
                    module.to(weight.device)

    def _prepare_model(self, peft_config: NeuroAdaConfig, model: nn.Module) -> None:
        """Check every matched target before any is replaced, so a bad target changes nothing."""
        problems = []
        for key, module in model.named_modules():
            if "neuroada_" in key or not self._check_target_module_exists(peft_config, key):
                continue
            try:
                check_supported_target(module, key)
                base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
                if peft_config.top_k > base.in_features:
                    raise ValueError(
                        f"top_k={peft_config.top_k} exceeds in_features={base.in_features} of layer {key} "
                        f"(weight shape {[base.out_features, base.in_features]}); lower top_k or exclude this layer."
                    )
            except (UnsupportedTargetError, ValueError) as error:
                problems.append(error)
        if problems:
            listed = "\n  - ".join(str(p) for p in problems[:10])
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            kind = (
                UnsupportedTargetError if all(isinstance(p, UnsupportedTargetError) for p in problems) else ValueError
            )
            raise kind(
                f"NeuroAda cannot adapt {len(problems)} targeted layer(s); nothing was changed:\n  - {listed}{more}"
            )

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Merge into the base weights; every layer is checked first, so a NaN/inf merge changes nothing."""
        self._check_merge(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(self, merge: bool = True, *args: Any, **kwargs: Any):
        if merge:
            self._check_merge(kwargs.get("adapter_names"))
        return super()._unload_and_optionally_merge(merge, *args, **kwargs)

    def _check_merge(self, adapter_names: list[str] | None) -> None:
        for module in self.model.modules():
            if isinstance(module, NeuroAdaLayer) and not module.disable_adapters:
                module.check_merge(adapter_names)

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

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's cast (bf16/fp16 adapters upcast to float32 unless ``autocast_adapter_dtype=False``; flags kept by
        :class:`ParameterDictTuner`), except that a theta pinned by ``config.theta_dtype`` keeps that dtype."""
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
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

    def _check_new_adapter_config(self, config: NeuroAdaConfig) -> None:
        super()._check_new_adapter_config(config)
        if not isinstance(config, NeuroAdaConfig):
            raise TypeError(f"NeuroAdaModel needs a NeuroAdaConfig, got {type(config).__name__}.")


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


def check_supported_target(target: nn.Module, module_name: str) -> None:
    """Raise :class:`UnsupportedTargetError` unless ``target`` is a float ``nn.Linear`` or a bitsandbytes layer."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    kind = type(base).__name__
    if bnb_layer_kind(base) is not None:
        return
    weight = getattr(base, "weight", None)
    quantized = (
        hasattr(base, "quant_state")
        or hasattr(base, "qweight")
        or (weight is not None and type(weight).__name__ in {"Params4bit", "Int8Params"})
        or (weight is not None and not weight.is_floating_point())
        or getattr(base, "quant_method", None) is not None
    )
    if quantized:
        raise UnsupportedTargetError(
            f"NeuroAda cannot adapt {module_name} ({kind}): it is quantized with a scheme NeuroAda does not support. "
            f"Supported quantized layers: {'; '.join(SUPPORTED_QUANTIZED_LAYERS.values())}. Load the base model "
            "with bitsandbytes (BitsAndBytesConfig) or unquantized (e.g. bf16)."
        )
    if kind == "Conv1D":
        raise UnsupportedTargetError(
            f"NeuroAda cannot adapt {module_name}: GPT-2 style Conv1D layers (weight stored [in, out]) are not "
            "supported. Target torch.nn.Linear modules, or set exclude_modules to skip it."
        )
    if not isinstance(base, torch.nn.Linear):
        raise UnsupportedTargetError(
            f"NeuroAda cannot adapt {module_name} ({kind}): only torch.nn.Linear layers are supported. Adjust "
            "target_modules (or exclude_modules) so it is not matched."
        )

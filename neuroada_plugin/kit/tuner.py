"""The PEFT tuner every method derives from: target checks from the spec's flags, layer creation, merge checks.

A method's tuner sets ``method_name`` and ``tuner_layer_cls`` and writes :meth:`MethodTuner.create_layer`
(and, when it has any, :meth:`MethodTuner.check_target_fits` for limits of its own, such as NeuroAda's
``top_k <= in_features``). Everything else is here, once:

* the PEFT prefix, from the method's spec;
* what a method's capability flags forbid, checked for every matched module before any is
  replaced (so a bad target changes nothing), with one wording: quantized layers other than the
  spec's ``quantized_layers``, non-``nn.Linear`` modules, weights sharded by ZeRO-3 for a method
  that reads them without ``supports_sharding``;
* ``_create_and_replace`` and the device placement of new adapter tensors;
* every layer checked before any is merged (NaN/inf), in ``merge_adapter`` and ``merge_and_unload``;
* PEFT's dtype cast keeping each adapter tensor's ``requires_grad`` (PEFT's generic
  ``_cast_adapter_dtype`` re-wraps ``ParameterDict`` entries as trainable parameters: a frozen,
  inactive or inference-only adapter would silently become trainable), then a method's own dtype
  option (``_pin_adapter_dtype``), and the resulting dtypes recorded on quantized bases so that a
  trainer's later bf16 cast is undone (:mod:`.adapter_dtype`);
* the base-fingerprint mismatches its layers note while loading, raised once the load is complete
  (:mod:`.fingerprint`), and the guard of bitsandbytes 4-bit layers against their CPU-packed layout
  while the adapter is attached (:mod:`.bnb_cpu_layout`).
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from ..config_base import DEFAULT_TARGET_MODULES
from ..errors import UnsupportedTargetError
from ..registry import MethodSpec, get_method
from .adapter_dtype import record_adapter_dtypes
from .bnb_cpu_layout import guard_4bit_layers, unguard_4bit_layers
from .fingerprint import raise_pending_mismatches
from .quantized import (
    SUPPORTED_QUANTIZED_LAYERS,
    bnb_layer_kind,
    quantization_settings,
    record_base_quantization,
    recorded_quantization,
)
from .sharded import full_shape, is_partitioned

__all__ = ["MethodTuner", "check_target"]


def _base(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def check_target(spec: MethodSpec, target: nn.Module, module_name: str, *, loading: bool = False) -> None:
    """Raise :class:`UnsupportedTargetError` when ``spec``'s flags say its method cannot adapt ``target``.

    ``loading``: the adapter is being loaded from a file (PEFT's inference mode), which brings what
    creation would have read from the weight.
    """
    base = _base(target)
    kind, title = type(base).__name__, spec.display_name
    quantized_kind = bnb_layer_kind(base)
    if quantized_kind is not None and quantized_kind in spec.quantized_layers:
        return
    weight = getattr(base, "weight", None)
    quantized = quantized_kind is not None or (
        hasattr(base, "quant_state")
        or hasattr(base, "qweight")
        or (weight is not None and type(weight).__name__ in {"Params4bit", "Int8Params"})
        or (weight is not None and not weight.is_floating_point())
        or getattr(base, "quant_method", None) is not None
    )
    if quantized:
        supported = [SUPPORTED_QUANTIZED_LAYERS[k] for k in spec.quantized_layers if k in SUPPORTED_QUANTIZED_LAYERS]
        advice = (
            f"Supported quantized layers: {'; '.join(supported)}. Load the base model with bitsandbytes "
            "(BitsAndBytesConfig) or unquantized (e.g. bf16)."
            if supported
            else f"{title} needs the floating-point weight: load the base model unquantized (e.g. bf16)."
        )
        raise UnsupportedTargetError(
            f"{title} cannot adapt {module_name} ({kind}): it is quantized with a scheme {title} does not support. "
            + advice
        )
    if kind == "Conv1D":
        raise UnsupportedTargetError(
            f"{title} cannot adapt {module_name}: GPT-2 style Conv1D layers (weight stored [in, out]) are not "
            "supported. Target torch.nn.Linear modules, or set exclude_modules to skip it."
        )
    if not isinstance(base, nn.Linear):
        raise UnsupportedTargetError(
            f"{title} cannot adapt {module_name} ({kind}): only torch.nn.Linear layers are supported. Adjust "
            "target_modules (or exclude_modules) so it is not matched."
        )
    if base.weight.is_meta and spec.reads_weights_when_created and not spec.supports_sharding and not loading:
        raise UnsupportedTargetError(
            f"{title} cannot adapt {module_name}: its weight is on the meta device (not loaded on this process, e.g. "
            f"FSDP cpu_ram_efficient_loading on a rank other than 0), and {title} reads the weight when the adapter is "
            "created. Load the weights on every process, or create the adapter before sharding."
        )
    reads_weights = spec.reads_weights_in_forward or spec.reads_weights_when_created
    # A ZeRO-3 partition can be gathered (supports_sharding); a weight that is not 2-D otherwise cannot.
    partitioned = is_partitioned(base.weight)
    sharded = (partitioned and not spec.supports_sharding) or (not partitioned and base.weight.dim() != 2)
    if sharded and reads_weights:
        where = " in every forward" if spec.reads_weights_in_forward else ""
        advice = (
            "It is not a DeepSpeed ZeRO-3 partition, which could be gathered: load the weights whole"
            if spec.supports_sharding
            else "Use ZeRO-1/2, DDP or FSDP"
        )
        raise UnsupportedTargetError(
            f"{title} cannot adapt {module_name}: its weight is a {tuple(base.weight.shape)} shard (DeepSpeed "
            f"ZeRO-3?), and {title} reads the whole frozen weight{where}. {advice}."
        )


def _loaded_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype a Transformers model was loaded in (``config.dtype``), else that of its first float parameter."""
    dtype = getattr(getattr(model, "config", None), "dtype", None) or getattr(
        getattr(model, "config", None), "torch_dtype", None
    )
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def _note_trained_quantization(layer: nn.Module, adapter_name: str, settings: dict[str, Any] | None) -> None:
    """Tell a weight-function layer which quantization ``adapter_name`` reproduces (``None``: none)."""
    reproduced = getattr(layer, "reproduced_quantization", None)
    if reproduced is None:
        return
    if settings is None:
        reproduced.pop(adapter_name, None)
    else:
        reproduced[adapter_name] = dict(settings)


class MethodTuner(BaseTuner):
    """``BaseTuner`` of a registered method (see the module docstring for what it does for every method).

    Subclasses set ``method_name`` (the registry name) and ``tuner_layer_cls``, and implement
    :meth:`create_layer`. ``target_module_mapping`` defaults to the shared architecture defaults.
    """

    method_name: ClassVar[str] = ""
    prefix: str = ""
    target_module_mapping = DEFAULT_TARGET_MODULES

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.method_name:
            cls.prefix = f"{cls.method_name}_"  # what MethodSpec.prefix derives, without importing the registry here

    @property
    def spec(self) -> MethodSpec:
        return get_method(self.method_name)

    # ---------------------------------------------------------------------------- what a method writes

    def create_layer(self, target: nn.Module, adapter_name: str, config: Any, module_name: str) -> nn.Module:
        """The method's tuner layer wrapping ``target`` (already checked against the spec's flags)."""
        raise NotImplementedError

    def check_target_fits(self, config: Any, target: nn.Module, module_name: str, in_features: int) -> None:
        """Raise ``ValueError`` when ``config`` does not fit ``target`` (a method's own limits); default: fits."""

    # ---------------------------------------------------------------------------- shared

    def _create_and_replace(
        self, config: Any, adapter_name: str, target: nn.Module, target_name: str, parent: nn.Module,
        current_key: str, **optional_kwargs: Any,
    ) -> None:  # fmt: skip
        trained_quantization = self._trained_quantization(config, target, current_key)
        if isinstance(target, self.tuner_layer_cls):
            _note_trained_quantization(target, adapter_name, trained_quantization)
            target.update_layer(adapter_name, config, module_name=current_key)
            return
        check_target(self.spec, target, current_key, loading=bool(getattr(config, "inference_mode", False)))
        new_module = self.create_layer(target, adapter_name, config, current_key)
        _note_trained_quantization(new_module, adapter_name, trained_quantization)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _trained_quantization(self, config: Any, target: nn.Module, module_name: str) -> dict[str, Any] | None:
        """For a method whose update is a function of the frozen weight (``reads_weights_in_forward``): which
        bitsandbytes settings the adapter's update is computed against, to be reproduced on this layer.

        A layer not yet in ``config.base_quantization`` records its own settings when it is quantized (the
        adapter is created here; the record is saved in ``adapter_config.json``). A recorded layer keeps its
        record: on an unquantized base the settings are returned, and the layer reproduces the quantized weight
        it was trained against; on a base quantized otherwise a warning is noted.
        """
        if not self.spec.reads_weights_in_forward:
            return None
        base = _base(target)
        settings = quantization_settings(base, _loaded_dtype(self.model)) if bnb_layer_kind(base) is not None else None
        recorded = recorded_quantization(config, module_name)
        if recorded is None:
            if settings is not None:
                record_base_quantization(config, module_name, settings)
            return None
        if settings is None:
            return recorded
        if settings != recorded:
            self.__dict__.setdefault("_quantization_differs", []).append(module_name)
        return None

    def _warn_quantization_differs(self) -> None:
        differs = self.__dict__.pop("_quantization_differs", [])
        if differs:
            title = self.spec.display_name
            warnings.warn(
                f"This {title} adapter was trained on a base quantized with other bitsandbytes settings "
                f"(adapter_config.json: base_quantization) than {len(differs)} layer(s) here (e.g. {differs[0]}). "
                f"{title}'s update is a function of the frozen weight, so here it is computed from this quantization "
                "and differs from the trained model's. Load the base with the BitsAndBytesConfig it was trained "
                "with, or unquantized (the recorded quantization is then reproduced).",
                UserWarning,
                stacklevel=4,
            )

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        setattr(parent, child_name, new_module)
        if hasattr(child, "base_layer"):
            child = child.base_layer
        # Adapter tensors live on the base layer's device (never on meta when it is real).
        weight = getattr(child, "weight", None)
        if weight is None or weight.is_meta:
            return
        for name, module in new_module.named_modules():
            if self.prefix in name and hasattr(module, "to"):
                if any(p.is_meta for p in module.parameters()) or any(b.is_meta for b in module.buffers()):
                    continue
                module.to(weight.device)

    def _prepare_model(self, peft_config: Any, model: nn.Module) -> None:
        """Check every matched target before any is replaced, so a bad target changes nothing."""
        problems = []
        for key, module in model.named_modules():
            if self.prefix in key or not self._check_target_module_exists(peft_config, key):
                continue
            try:
                check_target(self.spec, module, key, loading=bool(getattr(peft_config, "inference_mode", False)))
                base = _base(module)
                in_features = getattr(base, "in_features", None) or full_shape(base.weight)[-1]
                self.check_target_fits(peft_config, module, key, in_features)
            except (UnsupportedTargetError, ValueError) as error:
                problems.append(error)
        if problems:
            listed = "\n  - ".join(str(p) for p in problems[:10])
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            kind = (
                UnsupportedTargetError if all(isinstance(p, UnsupportedTargetError) for p in problems) else ValueError
            )
            title = self.spec.display_name
            raise kind(
                f"{title} cannot adapt {len(problems)} targeted layer(s); nothing was changed:\n  - {listed}{more}"
            )

    def _post_injection_hook(self, model: nn.Module, config: Any, adapter_name: str) -> None:
        super()._post_injection_hook(model, config, adapter_name)
        self._warn_quantization_differs()
        guard_4bit_layers(model)
        if not getattr(self, "_checks_base_fingerprints", False):
            self.register_load_state_dict_post_hook(lambda module, incompatible: raise_pending_mismatches(module))
            self._checks_base_fingerprints = True

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Merge into the base weights; every layer is checked first, so a NaN/inf merge changes nothing."""
        self._check_merge(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(self, merge: bool = True, *args: Any, **kwargs: Any) -> nn.Module:
        if merge:
            self._check_merge(kwargs.get("adapter_names"))
        model = super()._unload_and_optionally_merge(merge, *args, **kwargs)
        unguard_4bit_layers(model)  # the plain model goes back in bitsandbytes' standard layout, unhooked
        return model

    def _check_merge(self, adapter_names: list[str] | None) -> None:
        for module in self.model.modules():
            if isinstance(module, self.tuner_layer_cls) and not module.disable_adapters:
                module.check_merge(adapter_names)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        flags = [
            (container, container[adapter_name].requires_grad) for container in self._adapter_containers(adapter_name)
        ]
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
        self._pin_adapter_dtype(adapter_name)
        for container, requires_grad in flags:
            container[adapter_name].requires_grad_(requires_grad)
        for module in self.model.modules():
            if isinstance(module, self.tuner_layer_cls):
                record_adapter_dtypes(module, adapter_name)  # kept through TRL's bf16 cast (kit/adapter_dtype.py)

    def _pin_adapter_dtype(self, adapter_name: str) -> None:
        """A method's own dtype option, applied after PEFT's autocast (default: none; NeuroAda's ``theta_dtype``)."""

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

    def _check_new_adapter_config(self, config: Any) -> None:
        super()._check_new_adapter_config(config)
        expected = self.spec.config_class()
        if not isinstance(config, expected):
            raise TypeError(f"{type(self).__name__} needs a {expected.__name__}, got {type(config).__name__}.")

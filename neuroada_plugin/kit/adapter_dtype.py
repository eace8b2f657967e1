"""Adapter tensors keep the dtype their config chose when a trainer casts them behind PEFT's back.

TRL 1.16 (SFT, DPO, KTO, GRPO trainers; Axolotl's DPO/IPO/KTO/SimPO runs go through them) casts
every trainable parameter of a bitsandbytes-quantized model to bfloat16 right after the PeftModel
is built: QLoRA's convention, applied there because PEFT's ``autocast_adapter_dtype`` cannot be
passed for quantized models. For this package's methods it would silently override what the
adapter config says (NeuroAda's ``theta_dtype``, else PEFT's float32 autocast, which is what keeps
updates smaller than a bf16 ulp alive) while ``adapter_config.json`` still names float32.

So the tuner records, on quantized bases only, each float32/float64 adapter tensor as it was made
(:func:`record_adapter_dtypes`: a reference to the same storage, no copy), and the layer restores
it (:func:`restore_layer_dtypes`) before its forward, before the adapter is saved and before a
checkpoint is loaded into it. Values are restored bit for bit from the recorded tensor when the
cast is the only change since (the usual case: the cast happens before training), else upcast.
A dtype is never changed under DeepSpeed, FSDP or an initialised multi-process group (the engine
or DDP has already laid out the parameters): there a warning says what to do instead
(:func:`restore_adapter_dtypes` on the model before ``trainer.train()``, as the Axolotl plugin
does, or ``theta_dtype="bfloat16"`` to train in bf16 on purpose).
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from .quantized import bnb_layer_kind

__all__ = ["record_adapter_dtypes", "restore_adapter_dtypes", "restore_layer_dtypes"]

_REGISTRY = "_requested_adapter_tensors"  # layer.__dict__ entry: {(container, adapter): tensor as made}
_KEPT_DTYPES = (torch.float32, torch.float64)  # a downcast from these loses precision
_CAST_DTYPES = (torch.bfloat16, torch.float16)  # what trainers cast adapters to
_warned: set[str] = set()


def _containers(layer: nn.Module, adapter_name: str) -> list[tuple[str, nn.ParameterDict]]:
    found = []
    for attribute in getattr(layer, "adapter_layer_names", ()):
        container = getattr(layer, attribute, None)
        if isinstance(container, nn.ParameterDict) and adapter_name in container:
            found.append((attribute, container))
    return found


def record_adapter_dtypes(layer: nn.Module, adapter_name: str) -> None:
    """Remember ``adapter_name``'s float32/float64 tensors of ``layer`` if its base is bitsandbytes-quantized."""
    if bnb_layer_kind(layer.get_base_layer()) is None:
        return
    registry = layer.__dict__.setdefault(_REGISTRY, {})
    for attribute, container in _containers(layer, adapter_name):
        param = container[adapter_name]
        if param.dtype in _KEPT_DTYPES:
            registry[(attribute, adapter_name)] = param.data  # shares the parameter's storage


def _why_dtype_is_fixed(param: torch.Tensor, before_wrapping: bool) -> str | None:
    """Why a parameter's dtype may not change now (an engine or DDP owns its layout), or ``None``."""
    if hasattr(param, "ds_id"):
        return "DeepSpeed ZeRO-3 has partitioned it"
    if type(param.data).__name__ == "DTensor":
        return "FSDP has sharded it"
    for variable in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        if os.environ.get(variable, "").lower() in ("1", "true"):
            return f"the run uses {variable.removeprefix('ACCELERATE_USE_')}, whose engine holds its own copy"
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not before_wrapping and distributed and torch.distributed.get_world_size() > 1:
        return "a multi-process run may already have wrapped the model (DDP buckets keep the dtype)"
    return None


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


def restore_layer_dtypes(layer: nn.Module, before_wrapping: bool = False) -> list[str]:
    """Give ``layer``'s recorded adapter tensors back the dtype they were made in; returns what changed.

    ``before_wrapping=True`` skips the multi-process check (for a caller that runs before any wrapping, such as
    :func:`restore_adapter_dtypes` from a trainer hook); DeepSpeed and FSDP parameters are never changed.
    """
    registry = layer.__dict__.get(_REGISTRY)
    if not registry:
        return []
    restored = []
    for (attribute, adapter_name), made in list(registry.items()):
        container = getattr(layer, attribute, None)
        if not isinstance(container, nn.ParameterDict) or adapter_name not in container:
            del registry[(attribute, adapter_name)]  # adapter deleted
            continue
        param = container[adapter_name]
        if param.dtype == made.dtype:
            if param.data.data_ptr() != made.data_ptr():
                registry[(attribute, adapter_name)] = param.data  # moved or reloaded: follow it
            continue
        if param.dtype not in _CAST_DTYPES:
            continue
        why = _why_dtype_is_fixed(param, before_wrapping=before_wrapping)
        if why is not None:
            _warn_once(
                f"fixed:{adapter_name}",
                f"{type(layer).__name__} adapter {adapter_name!r}: the trainer cast its {attribute} to "
                f"{str(param.dtype).removeprefix('torch.')} (TRL does so on quantized models) and it cannot be set "
                f"back to {str(made.dtype).removeprefix('torch.')} here: {why}. Call "
                "neuroada_plugin.restore_adapter_dtypes(trainer.model) before trainer.train(), or ask for bf16 "
                "explicitly (NeuroAda: theta_dtype='bfloat16') so the saved config matches the tensors.",
            )
            continue
        value = made.to(param.device)
        if not torch.equal(value.to(param.dtype), param.data):  # trained since the cast: keep its values
            value = param.data.to(made.dtype)
        param.data = value
        if param.grad is not None:
            param.grad = param.grad.to(made.dtype)
        registry[(attribute, adapter_name)] = param.data
        restored.append(f"{attribute}.{adapter_name}")
    if restored:
        _warn_once(
            "restored",
            f"the trainer cast the {type(layer).__name__} adapter tensors of this quantized model to bf16 (TRL's "
            "QLoRA convention); they are back in the dtype the adapter config chose (theta_dtype, else PEFT's "
            "float32 autocast). Set theta_dtype='bfloat16' to train NeuroAda in bf16 on purpose.",
        )
    return restored


def restore_adapter_dtypes(model: nn.Module) -> int:
    """Undo a trainer's cast of this package's adapter tensors on a quantized base; returns how many changed.

    Call it after building a TRL trainer and before ``trainer.train()`` in multi-process runs (single-process
    runs restore on the first forward by themselves). A no-op on full-precision bases.
    """
    return sum(len(restore_layer_dtypes(module, before_wrapping=True)) for module in model.modules())

"""QLoRA-style loading for this package's adapters in Axolotl: ``load_in_4bit`` / ``load_in_8bit``.

Axolotl 0.19 builds a ``BitsAndBytesConfig`` only for ``adapter: qlora`` (4-bit) and
``adapter: lora`` (8-bit), and runs ``prepare_model_for_kbit_training`` only for those; with
any other adapter ``load_in_4bit: true`` would load the model unquantized, silently. The plugin
therefore (1) wraps ``ModelLoader._set_quantization_config`` so that a method whose spec lists
the kind in ``quantized_layers`` gets the same bitsandbytes settings QLoRA gets (NF4, double
quantization, compute dtype = the run's dtype, ``bnb_config_kwargs`` applied on top), and
(2) prepares the quantized model for k-bit training before the adapter is created.
Read against axolotl 0.19.0.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ...registry import MethodSpec
from .validation import QUANTIZED_LOADING, cfg_get

__all__ = ["QUANTIZED_LOADING", "bnb_settings", "install_quantized_loading", "prepare_quantized_model"]


def _spec(specs: Iterable[MethodSpec], cfg: Any) -> MethodSpec | None:
    adapter = cfg_get(cfg, "adapter")
    return next((spec for spec in specs if spec.name == adapter), None)


def bnb_settings(spec: MethodSpec, cfg: Any) -> dict[str, Any] | None:
    """``BitsAndBytesConfig`` keyword arguments for ``cfg`` (``None``: no quantized loading asked for)."""
    import torch

    if cfg_get(cfg, "load_in_4bit") and "bnb_4bit" in spec.quantized_layers:
        dtype = cfg_get(cfg, "torch_dtype") or torch.bfloat16
        settings: dict[str, Any] = {  # axolotl's own QLoRA settings (loaders/model.py)
            "load_in_4bit": True,
            "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False,
            "bnb_4bit_compute_dtype": dtype,
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_quant_storage": torch.bfloat16,
        }
        settings.update(cfg_get(cfg, "bnb_config_kwargs") or {})
        return settings
    if cfg_get(cfg, "load_in_8bit") and "bnb_8bit" in spec.quantized_layers:
        return {"load_in_8bit": True}
    return None


def install_quantized_loading(specs: Iterable[MethodSpec]) -> None:
    """Make axolotl's ``ModelLoader`` quantize the base model for ``specs``' adapters (idempotent)."""
    from axolotl.loaders.model import ModelLoader

    specs = tuple(specs)
    original = ModelLoader._set_quantization_config
    if getattr(original, "_neuroada_plugin_specs", None) is not None:
        original._neuroada_plugin_specs.update({spec.name: spec for spec in specs})
        return
    known = {spec.name: spec for spec in specs}

    def _set_quantization_config(loader: Any) -> None:
        original(loader)
        spec = _spec(known.values(), loader.cfg)
        if spec is None or "quantization_config" in loader.model_kwargs:
            return
        settings = bnb_settings(spec, loader.cfg)
        if settings is not None:
            from transformers import BitsAndBytesConfig

            loader.model_kwargs["quantization_config"] = BitsAndBytesConfig(**settings)

    _set_quantization_config._neuroada_plugin_specs = known  # type: ignore[attr-defined]
    _set_quantization_config.__wrapped__ = original  # type: ignore[attr-defined]
    ModelLoader._set_quantization_config = _set_quantization_config


def prepare_quantized_model(specs: Iterable[MethodSpec], cfg: Any, model: Any) -> str | None:
    """PEFT's ``prepare_model_for_kbit_training`` on a quantized base (what axolotl does for LoRA/QLoRA).

    Returns a line for the log (which layers are quantized), or ``None`` when nothing was to do.
    """
    spec = _spec(specs, cfg)
    if spec is None or bnb_settings(spec, cfg) is None:
        return None
    if not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
        raise RuntimeError(
            f"`adapter: {spec.name}` with load_in_4bit/load_in_8bit, but the model was loaded unquantized; the "
            "plugin's quantized loading did not take effect. Check that the plugin is listed under `plugins:`."
        )
    from peft import prepare_model_for_kbit_training

    from ...kit.quantized import bnb_layer_kind

    kinds: dict[str, int] = {}
    for module in model.modules():
        kind = bnb_layer_kind(module)
        if kind is not None:
            kinds[kind] = kinds.get(kind, 0) + 1
    checkpointing = bool(cfg_get(cfg, "gradient_checkpointing"))
    prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    counts = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
    return (
        f"quantized base for adapter: {spec.name}: {counts} layers; prepare_model_for_kbit_training "
        f"(gradient checkpointing {'on' if checkpointing else 'off'})"
    )

"""Checks of an Axolotl config for this package's adapters, run while the YAML is validated.

Everything that can be checked without a model is checked here, so a run never fails after
minutes of data preparation. What a method accepts comes from its spec's capability flags,
not from one method's policies:

* ``needs_float_weights``: quantized loading (``load_in_4bit`` ...) is refused;
* ``reads_weights_when_created`` without ``supports_sharding``: configurations that hand the
  method partitioned or meta weights when the adapter is created (DeepSpeed ZeRO-3, FSDP
  ``cpu_ram_efficient_loading``) are refused; with it they pass (ZeRO-3 still needs
  ``stage3_gather_16bit_weights_on_model_save: true``, or the saved adapter would be empty);
* ``reads_weights_in_forward`` without ``supports_sharding``: DeepSpeed ZeRO-3 is refused (the
  layer would see a partition of the weight in its forward);
* every method: misspelt ``<method>_*`` keys, LoRA-only keys that would be ignored, merge
  methods that only understand LoRA files, and RL continuations that would drop the adapter.

Read against axolotl 0.19.0.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping
from typing import Any

from pydantic import model_validator

from ...registry import MethodSpec
from .args import MethodArgsBase, exposed_fields, yaml_key

__all__ = ["ValidatedMethodArgs", "check_raw_config", "peft_config_from_cfg"]

# RL types for which axolotl asks the adapter loader for the config only and lets TRL wrap
# the policy (axolotl/loaders/model.py `_load_adapters`).
CONFIG_ONLY_RL = ("dpo", "ipo", "kto")

# LoRA-specific keys that shape what a LoRA adapter trains. With another adapter they would
# be ignored silently; they are rejected instead. Values: the replacement field, if any.
_LORA_KEYS: dict[str, str | None] = {
    "lora_r": None,
    "lora_alpha": None,
    "lora_target_modules": "target_modules",
    "lora_target_linear": "target_modules",
    "lora_target_parameters": None,
    "lora_fan_in_fan_out": None,
    "lora_rank_pattern": None,
    "lora_alpha_pattern": None,
    "peft_layers_to_transform": "layers_to_transform",
    "peft_layers_pattern": "layers_pattern",
    "peft_use_dora": None,
    "peft_use_rslora": None,
    "peft_init_lora_weights": "init_weights",
    "loraplus_lr_ratio": None,
}
_QUANTIZATION_KEYS = ("load_in_8bit", "load_in_4bit", "gptq", "quantize_moe_experts")
# Quantized loading a method may accept: YAML key -> the layer kind its spec lists in quantized_layers.
QUANTIZED_LOADING = {"load_in_4bit": "bnb_4bit", "load_in_8bit": "bnb_8bit"}


def declared_keys(spec: MethodSpec) -> list[str]:
    """The YAML keys ``spec`` understands."""
    return sorted(yaml_key(spec, f.name) for f in exposed_fields(spec))


def cfg_get(cfg: Any, key: str) -> Any:
    """``cfg[key]`` for a dict, ``DictDefault`` or args model (``None`` when absent)."""
    if isinstance(cfg, Mapping):
        return cfg.get(key)
    return getattr(cfg, key, None)


def _present(data: Mapping[str, Any], key: str) -> bool:
    return key in data and data[key] is not None


def check_raw_config(spec: MethodSpec, data: Mapping[str, Any]) -> Mapping[str, Any]:
    """Reject what would be ignored or fail late; returns ``data`` (a copy when a default is filled in)."""
    prefix, name, declared = spec.yaml_prefix, spec.name, declared_keys(spec)
    unknown = sorted(k for k in data if isinstance(k, str) and k.startswith(prefix) and k not in declared)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, declared, n=1)
            hints.append(f"`{key}`" + (f" (did you mean `{close[0]}`?)" if close else ""))
        raise ValueError(
            f"Unknown {prefix}* key(s): {', '.join(hints)}. Keys understood by adapter: {name}: {', '.join(declared)}."
        )
    used = [k for k in declared if _present(data, k)]
    adapter = data.get("adapter")
    if adapter != name:
        if used:
            raise ValueError(
                f"{', '.join(used)} set, but `adapter:` is {adapter!r}. These keys configure `adapter: {name}`; "
                f"set `adapter: {name}` or remove them."
            )
        return data
    _check_base_model_loading(spec, data)
    _check_lora_keys(spec, declared, data)
    data = _check_merge_method(spec, data)
    _check_rl(spec, data)
    return data


def _check_base_model_loading(spec: MethodSpec, data: Mapping[str, Any]) -> None:
    name = spec.name
    quantized = [k for k in _QUANTIZATION_KEYS if data.get(k)]
    refused = [k for k in quantized if QUANTIZED_LOADING.get(k) not in spec.quantized_layers]
    if refused and spec.needs_float_weights:
        supported = [k for k, kind in QUANTIZED_LOADING.items() if kind in spec.quantized_layers]
        offer = (
            f"Supported quantized loading for `adapter: {name}`: {', '.join(f'{k}: true' for k in supported)} "
            "(bitsandbytes). "
            if supported
            else ""
        )
        raise ValueError(
            f"`adapter: {name}` cannot train on this quantized base model ({', '.join(f'{k}: true' for k in refused)}): "
            f"it reads and merges into individual entries of the weight. {offer}Otherwise remove "
            f"{', '.join(refused)} and load the model in bf16/fp16/fp32."
        )
    _check_sharding(spec, data)


def _check_sharding(spec: MethodSpec, data: Mapping[str, Any]) -> None:
    """ZeRO-2/3 and FSDP (incl. ``cpu_ram_efficient_loading``) pass for a method that ``supports_sharding``.

    Refused: a method that reads weights when created without gathering them (``supports_sharding``
    false) under ZeRO-3 or RAM-efficient loading, and ZeRO-3 without
    ``stage3_gather_16bit_weights_on_model_save: true`` (the Trainer would then save an empty adapter
    next to a DeepSpeed checkpoint, for every PEFT method).
    """
    name = spec.name
    zero_stage = deepspeed_zero_stage(data.get("deepspeed"))
    fsdp_config = data.get("fsdp_config")
    ram_efficient = isinstance(fsdp_config, Mapping) and bool(fsdp_config.get("cpu_ram_efficient_loading"))
    if spec.reads_weights_when_created and not spec.supports_sharding:
        if zero_stage == 3:
            raise ValueError(
                f"DeepSpeed ZeRO-3 (`deepspeed: {data.get('deepspeed')}`) partitions the weights while the model "
                f"loads, but `adapter: {name}` reads the full weights when the adapter is created and cannot gather "
                "them. Use ZeRO-1/2, DDP, or FSDP."
            )
        if ram_efficient:
            raise ValueError(
                "`fsdp_config.cpu_ram_efficient_loading: true` loads the weights on non-zero ranks as meta tensors, "
                f"but `adapter: {name}` reads the weights when the adapter is created. Set it to false."
            )
    if spec.reads_weights_in_forward and not spec.supports_sharding and zero_stage == 3:
        raise ValueError(
            f"DeepSpeed ZeRO-3 (`deepspeed: {data.get('deepspeed')}`) partitions every weight outside its own "
            f"layer's matmul, but `adapter: {name}` reads the full frozen weight in every forward pass. Use "
            "ZeRO-1/2, DDP, or FSDP (which keeps a wrapped layer's weights whole through its forward and backward)."
        )
    if zero_stage == 3 and _zero3_gathers_on_save(data.get("deepspeed")) is False:
        raise ValueError(
            f"DeepSpeed ZeRO-3 (`deepspeed: {data.get('deepspeed')}`) without "
            "`zero_optimization.stage3_gather_16bit_weights_on_model_save: true`: the trainer would save an empty "
            f"`adapter: {name}` file (each rank holds only a partition of theta) and a DeepSpeed checkpoint instead. "
            "Set it to true in the DeepSpeed JSON (axolotl_configs/deepspeed/zero3.json does)."
        )


def _deepspeed_config(deepspeed: Any) -> Mapping[str, Any] | None:
    config = deepspeed
    if isinstance(deepspeed, (str, os.PathLike)) and os.path.isfile(deepspeed):
        try:
            with open(deepspeed, encoding="utf-8") as handle:
                config = json.load(handle)
        except (OSError, ValueError):
            return None
    return config if isinstance(config, Mapping) else None


def _zero3_gathers_on_save(deepspeed: Any) -> bool | None:
    """``stage3_gather_16bit_weights_on_model_save`` of a readable DeepSpeed config (``None``: unknown)."""
    config = _deepspeed_config(deepspeed)
    if config is None:
        return None
    value = (config.get("zero_optimization") or {}).get("stage3_gather_16bit_weights_on_model_save", False)
    if value == "auto":  # accelerate fills "auto" in from its own default (true for ZeRO-3 model saving)
        return None
    return bool(value)


def _check_lora_keys(spec: MethodSpec, declared: list[str], data: Mapping[str, Any]) -> None:
    lora_keys = [k for k in _LORA_KEYS if _present(data, k) and data[k] is not False]
    if data.get("lora_dropout"):
        lora_keys.append("lora_dropout")
    if lora_keys:
        hints = []
        for key in lora_keys:
            replacement = _LORA_KEYS.get(key)
            target = yaml_key(spec, replacement) if replacement else None
            hints.append(f"`{key}`" + (f" (use `{target}`)" if target in declared else ""))
        raise ValueError(
            f"LoRA-only setting(s) {', '.join(hints)} have no effect with `adapter: {spec.name}`. Remove them; "
            f"the {spec.name} settings are {', '.join(declared)}."
        )
    modules_key = yaml_key(spec, "modules_to_save")
    if (
        _present(data, "lora_modules_to_save")
        and _present(data, modules_key)
        and list(data["lora_modules_to_save"]) != list(data[modules_key])
    ):
        raise ValueError(
            f"Both `lora_modules_to_save` {list(data['lora_modules_to_save'])} and `{modules_key}` "
            f"{list(data[modules_key])} are set and differ. Keep one (axolotl's added-token checks read "
            "`lora_modules_to_save`, which the adapter also honours)."
        )


def _check_merge_method(spec: MethodSpec, data: Mapping[str, Any]) -> Mapping[str, Any]:
    """``axolotl merge-lora``'s default merger reads LoRA files only; the legacy one loads the adapter."""
    merge_method = data.get("merge_method")
    if merge_method not in (None, "legacy"):
        raise ValueError(
            f"`merge_method: {merge_method}` only merges LoRA/DoRA files; `adapter: {spec.name}` is merged by "
            "loading the adapter and calling merge_and_unload. Remove `merge_method` (it defaults to `legacy` for "
            "this adapter) or set `merge_method: legacy`."
        )
    return {**data, "merge_method": "legacy"} if merge_method is None else data  # never mutate the caller's dict


def _check_rl(spec: MethodSpec, data: Mapping[str, Any]) -> None:
    rl_type = str(data.get("rl") or "").lower()
    if rl_type in CONFIG_ONLY_RL and _present(data, "lora_model_dir") and not data.get("merge_lora"):
        raise ValueError(
            f"`rl: {data.get('rl')}` with `lora_model_dir` would restart the {spec.name} adapter from zero: for "
            "this RL type axolotl lets TRL create the adapter from its config, never loading saved values. "
            "Merge the adapter first (`axolotl merge-lora <config>`) and use `<output_dir>/merged` as "
            "`base_model`."
        )


def deepspeed_zero_stage(deepspeed: Any) -> int | None:
    """ZeRO stage of an axolotl ``deepspeed:`` value (path to a JSON file or an inline dict)."""
    config = _deepspeed_config(deepspeed)
    if config is not None:
        stage = (config.get("zero_optimization") or {}).get("stage")
        return int(stage) if isinstance(stage, int) else None
    if isinstance(deepspeed, str) and "zero3" in os.path.basename(deepspeed):  # a name axolotl resolves itself
        return 3
    return None


def _task_type(model: Any) -> str:
    """PEFT task type for ``model``: sequence/token classification heads, else causal LM."""
    name = type(model).__name__ if model is not None else ""
    if "SequenceClassification" in name:
        return "SEQ_CLS"
    if "TokenClassification" in name:
        return "TOKEN_CLS"
    return "CAUSAL_LM"


def peft_config_from_cfg(spec: MethodSpec, cfg: Any, model: Any = None) -> Any:
    """The method's ``PeftConfig`` from an axolotl config (dict, ``DictDefault`` or args model).

    Unset keys keep the config class's defaults. The config class's own validation errors
    are re-raised as ``ValueError`` naming the YAML keys (``NeuroAdaConfig.top_k`` ->
    ``neuroada_top_k``).
    """
    config_cls = spec.config_class()
    names = {f.name for f in exposed_fields(spec)}
    kwargs: dict[str, Any] = {}
    for field_name in sorted(names):
        value = cfg_get(cfg, yaml_key(spec, field_name))
        if value is not None:
            kwargs[field_name] = value
    if "modules_to_save" in names and "modules_to_save" not in kwargs:
        lora_modules = cfg_get(cfg, "lora_modules_to_save")
        if lora_modules:
            kwargs["modules_to_save"] = list(lora_modules)
    try:
        return config_cls(task_type=_task_type(model), **kwargs)
    except (TypeError, ValueError) as error:
        message = str(error).replace(f"{config_cls.__name__}.", spec.yaml_prefix)
        raise ValueError(f"Invalid `adapter: {spec.name}` settings: {message}") from error


class ValidatedMethodArgs(MethodArgsBase):
    """Validators of the generated args model; they see the whole YAML (Axolotl merges the model into its own)."""

    @model_validator(mode="before")
    @classmethod
    def _neuroada_plugin_check_raw_config(cls, data: Any) -> Any:
        """Reject, with the offending key named, what would otherwise be ignored or fail late."""
        if not isinstance(data, Mapping):
            return data
        for spec in cls._specs():
            data = check_raw_config(spec, data)
        return data

    @model_validator(mode="after")
    def _neuroada_plugin_build_peft_config(self) -> ValidatedMethodArgs:
        """Build the selected method's ``PeftConfig`` once, so its own validation runs before any loading."""
        for spec in type(self)._specs():
            if getattr(self, "adapter", None) == spec.name:
                peft_config_from_cfg(spec, self)
        return self

    @classmethod
    def _specs(cls) -> list[MethodSpec]:
        """Methods of every generated args model in the class hierarchy (several plugins may be merged)."""
        specs: list[MethodSpec] = []
        for klass in cls.__mro__:
            for spec in klass.__dict__.get("peft_methods", ()):
                if spec not in specs:
                    specs.append(spec)
        return specs

"""Axolotl plugin base for this package's PEFT methods (method-agnostic).

Axolotl (0.19) lets a plugin contribute an ``adapter:`` name. This module turns any PEFT
method of this package into such an adapter with four ingredients, bundled in a
:class:`PeftMethodSpec` plus a pydantic args model:

* the adapter name users write (``adapter: neuroada``),
* the ``PeftConfig`` subclass of the method,
* the prefix of its YAML keys (``neuroada_top_k`` -> ``NeuroAdaConfig.top_k``),
* a :class:`PeftMethodArgs` subclass declaring every prefixed key with its type.

Why each piece exists (read against axolotl 0.19.0):

* Axolotl silently drops YAML keys no schema declares, so the args model declares every key,
  and :class:`PeftMethodArgs` rejects misspelt prefixed keys instead of ignoring them.
* Everything that can be checked without a model is checked while the config is validated
  (types, the method's own ``__post_init__`` rules, quantized loading, LoRA-only keys,
  ZeRO-3, RL continuation), so a run never fails after minutes of data preparation.
* ``load_adapter`` returns a real ``PeftModel`` (from ``get_peft_model``, or
  ``PeftModel.from_pretrained`` when ``lora_model_dir`` is set): saving is then adapter-only
  in the PEFT format and ``merge_and_unload`` works. With ``config_only=True`` (DPO/IPO/KTO)
  it returns just the config and TRL wraps the policy itself.
* ``axolotl merge-lora``'s default "memory_efficient" merger understands only LoRA files; the
  validator switches ``merge_method`` to ``legacy``, which loads the adapter through the
  plugin and calls ``merge_and_unload()`` (exact for these methods).

Importing this module needs Axolotl; ``import neuroada_plugin`` does not.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

try:
    from axolotl.integrations.base import AdapterCapabilities, BasePlugin
    from axolotl.utils.logging import get_logger
except ImportError as error:  # pragma: no cover - exercised only without axolotl
    raise ImportError(
        "neuroada_plugin's Axolotl integration needs Axolotl (tested with axolotl==0.19.0), which is not "
        "importable here. From a checkout run `bash scripts/setup_axolotl.sh` and use `.venv-axolotl/bin/axolotl`; "
        "elsewhere `pip install axolotl==0.19.0 neuroada-plugin` (see axolotl_configs/README.md)."
    ) from error
from peft import PeftConfig, PeftModel, get_peft_model
from pydantic import BaseModel, model_validator

__all__ = ["PeftMethodArgs", "PeftMethodPlugin", "PeftMethodSpec"]

LOG = get_logger(__name__)

# RL types for which axolotl asks the adapter loader for the config only and lets TRL wrap
# the policy (axolotl/loaders/model.py `_load_adapters`).
_CONFIG_ONLY_RL = ("dpo", "ipo", "kto")

# LoRA-specific keys that shape what a LoRA adapter trains. With another adapter they would
# be ignored silently; they are rejected instead. Values: the replacement key suffix, if any.
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
# Quantized loading: the methods here select from, and merge into, an exact float weight.
_QUANTIZATION_KEYS = ("load_in_8bit", "load_in_4bit", "gptq", "quantize_moe_experts")


@dataclass(frozen=True)
class PeftMethodSpec:
    """What the Axolotl integration needs to know about one PEFT method.

    Attributes:
        name: The ``adapter:`` value that selects the method (``"neuroada"``).
        config_cls: The method's ``PeftConfig`` subclass; its ``__post_init__`` is the
            authority on valid values and is run at config validation.
        key_prefix: Prefix of the method's YAML keys (``"neuroada_"``); ``<prefix><field>``
            sets ``config_cls.<field>``.
        quantization_hint: Why quantized base models are refused, for the error message.
    """

    name: str
    config_cls: type[PeftConfig]
    key_prefix: str
    quantization_hint: str = "the method needs an exact floating-point base weight to select from and merge into"

    def config_fields(self) -> set[str]:
        """Names of the dataclass fields of ``config_cls`` (what a prefixed key may set)."""
        return {f.name for f in dataclasses.fields(self.config_cls)}


class PeftMethodArgs(BaseModel):
    """Base of the pydantic args model of one method; subclass it and declare the keys.

    A subclass sets ``peft_method`` and declares one optional field per supported key,
    named ``<key_prefix><config field>`` with default ``None`` ("use the config class's
    default", so defaults live in one place). Axolotl merges the subclass into its own
    config model by inheritance, so the validators below see the whole YAML; they loop over
    every method found in the merged class, so several methods' plugins can be active.
    """

    peft_method: ClassVar[PeftMethodSpec]

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        """Catch a developer error early: every prefixed field must map to a config field."""
        super().__pydantic_init_subclass__(**kwargs)
        spec = cls.__dict__.get("peft_method")
        if spec is None:
            return
        unmapped = sorted(
            name
            for name in cls.model_fields
            if name.startswith(spec.key_prefix) and name[len(spec.key_prefix) :] not in spec.config_fields()
        )
        if unmapped:
            raise TypeError(
                f"{cls.__name__} declares {unmapped}, which do not map to fields of {spec.config_cls.__name__} "
                f"(fields: {sorted(spec.config_fields())})."
            )

    @classmethod
    def peft_method_keys(cls, spec: PeftMethodSpec) -> list[str]:
        """The YAML keys declared for ``spec`` (every model field starting with its prefix)."""
        return sorted(name for name in cls.model_fields if name.startswith(spec.key_prefix))

    @classmethod
    def _peft_methods(cls) -> list[PeftMethodSpec]:
        specs: list[PeftMethodSpec] = []
        for klass in cls.__mro__:
            spec = klass.__dict__.get("peft_method")
            if isinstance(spec, PeftMethodSpec) and spec not in specs:
                specs.append(spec)
        return specs

    @model_validator(mode="before")
    @classmethod
    def _neuroada_plugin_check_raw_config(cls, data: Any) -> Any:
        """Reject, with the offending key named, what would otherwise be ignored or fail late."""
        if not isinstance(data, Mapping):
            return data
        for spec in cls._peft_methods():
            data = _check_raw_config(spec, cls.peft_method_keys(spec), data)
        return data

    @model_validator(mode="after")
    def _neuroada_plugin_build_peft_config(self) -> PeftMethodArgs:
        """Build the method's ``PeftConfig`` once, so its own validation runs before any loading."""
        for spec in type(self)._peft_methods():
            if getattr(self, "adapter", None) == spec.name:
                peft_config_from_cfg(spec, self)
        return self


def _present(data: Mapping[str, Any], key: str) -> bool:
    return key in data and data[key] is not None


def _check_raw_config(spec: PeftMethodSpec, declared: list[str], data: Mapping[str, Any]) -> Mapping[str, Any]:
    prefix, name = spec.key_prefix, spec.name
    adapter = data.get("adapter")
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
    if adapter != name:
        if used:
            raise ValueError(
                f"{', '.join(used)} set, but `adapter:` is {adapter!r}. These keys configure `adapter: {name}`; "
                f"set `adapter: {name}` or remove them."
            )
        return data

    quantized = [k for k in _QUANTIZATION_KEYS if data.get(k)]
    if quantized:
        raise ValueError(
            f"`adapter: {name}` cannot train on a quantized base model ({', '.join(f'{k}: true' for k in quantized)}): "
            f"{spec.quantization_hint}. Remove {', '.join(quantized)} and load the model in bf16/fp16/fp32."
        )
    lora_keys = [k for k in _LORA_KEYS if _present(data, k) and data[k] is not False]
    if data.get("lora_dropout"):
        lora_keys.append("lora_dropout")
    if lora_keys:
        hints = []
        for key in lora_keys:
            replacement = _LORA_KEYS.get(key)
            target = f"{prefix}{replacement}" if replacement and f"{prefix}{replacement}" in declared else None
            hints.append(f"`{key}`" + (f" (use `{target}`)" if target else ""))
        raise ValueError(
            f"LoRA-only setting(s) {', '.join(hints)} have no effect with `adapter: {name}`. Remove them; "
            f"the {name} settings are {', '.join(declared)}."
        )
    modules_key = f"{prefix}modules_to_save"
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

    merge_method = data.get("merge_method")
    if merge_method not in (None, "legacy"):
        raise ValueError(
            f"`merge_method: {merge_method}` only merges LoRA/DoRA files; `adapter: {name}` is merged by loading "
            "the adapter and calling merge_and_unload. Remove `merge_method` (it defaults to `legacy` for this "
            "adapter) or set `merge_method: legacy`."
        )
    if merge_method is None:
        data = {**data, "merge_method": "legacy"}  # a copy: never mutate the caller's config

    rl_type = str(data.get("rl") or "").lower()
    if rl_type in _CONFIG_ONLY_RL and _present(data, "lora_model_dir") and not data.get("merge_lora"):
        raise ValueError(
            f"`rl: {data.get('rl')}` with `lora_model_dir` would restart the {name} adapter from zero: for "
            "this RL type axolotl lets TRL create the adapter from its config, never loading saved values. "
            "Merge the adapter first (`axolotl merge-lora <config>`) and use `<output_dir>/merged` as "
            "`base_model`."
        )
    zero_stage = _deepspeed_zero_stage(data.get("deepspeed"))
    if zero_stage == 3:
        raise ValueError(
            f"DeepSpeed ZeRO-3 (`deepspeed: {data.get('deepspeed')}`) partitions the weights while the model "
            f"loads, so `adapter: {name}` cannot select connections from them. Use ZeRO-1/2, DDP, or FSDP."
        )
    fsdp_config = data.get("fsdp_config")
    if isinstance(fsdp_config, Mapping) and fsdp_config.get("cpu_ram_efficient_loading"):
        raise ValueError(
            f"`fsdp_config.cpu_ram_efficient_loading: true` loads the weights on non-zero ranks as meta tensors, "
            f"so `adapter: {name}` cannot select connections there. Set it to false."
        )
    return data


def _deepspeed_zero_stage(deepspeed: Any) -> int | None:
    """ZeRO stage of an axolotl ``deepspeed:`` value (path to a JSON file or an inline dict)."""
    config = deepspeed
    if isinstance(deepspeed, (str, os.PathLike)) and os.path.isfile(deepspeed):
        try:
            with open(deepspeed, encoding="utf-8") as handle:
                config = json.load(handle)
        except (OSError, ValueError):
            return None
    if isinstance(config, Mapping):
        stage = (config.get("zero_optimization") or {}).get("stage")
        return int(stage) if isinstance(stage, int) else None
    if isinstance(config, str) and "zero3" in os.path.basename(config):
        return 3
    return None


def _cfg_get(cfg: Any, key: str) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key)
    return getattr(cfg, key, None)


def _normalised(value: Any) -> Any:
    """Lists and sets compare as sorted lists (PEFT stores target_modules as a set)."""
    if isinstance(value, (list, set, tuple)):
        return sorted(value, key=repr)
    return value


def _task_type(model: Any) -> str:
    """PEFT task type for ``model``: sequence/token classification heads, else causal LM."""
    name = type(model).__name__ if model is not None else ""
    if "SequenceClassification" in name:
        return "SEQ_CLS"
    if "TokenClassification" in name:
        return "TOKEN_CLS"
    return "CAUSAL_LM"


def peft_config_from_cfg(spec: PeftMethodSpec, cfg: Any, model: Any = None) -> PeftConfig:
    """The method's ``PeftConfig`` from an axolotl config (dict, ``DictDefault`` or args model).

    Unset keys keep the config class's defaults. The config class's own validation errors
    are re-raised as ``ValueError`` naming the YAML keys (``NeuroAdaConfig.top_k`` ->
    ``neuroada_top_k``).
    """
    kwargs: dict[str, Any] = {}
    for field_name in sorted(spec.config_fields()):
        value = _cfg_get(cfg, f"{spec.key_prefix}{field_name}")
        if value is not None:
            kwargs[field_name] = value
    if "modules_to_save" in spec.config_fields() and "modules_to_save" not in kwargs:
        lora_modules = _cfg_get(cfg, "lora_modules_to_save")
        if lora_modules:
            kwargs["modules_to_save"] = list(lora_modules)
    try:
        return spec.config_cls(task_type=_task_type(model), **kwargs)
    except (TypeError, ValueError) as error:
        message = str(error).replace(f"{spec.config_cls.__name__}.", spec.key_prefix)
        raise ValueError(f"Invalid `adapter: {spec.name}` settings: {message}") from error


class PeftMethodPlugin(BasePlugin):
    """Axolotl plugin contributing ``adapter: <spec.name>``; subclass with ``spec`` and ``args_model``.

    Only the hooks an adapter needs are implemented: the args model, the adapter capability,
    and the loader. Everything else (training, saving, merge-lora's legacy path) is
    Axolotl's own code acting on the returned ``PeftModel``.
    """

    spec: ClassVar[PeftMethodSpec]
    args_model: ClassVar[type[PeftMethodArgs]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declares = "spec" in cls.__dict__ or "args_model" in cls.__dict__
        if declares and cls.args_model.__dict__.get("peft_method") is not cls.spec:
            raise TypeError(
                f"{cls.__name__}.args_model ({cls.args_model.__name__}) must set `peft_method = {cls.__name__}.spec`."
            )

    def get_input_args(self) -> str:
        """Dotted path of the args model; axolotl imports it and mixes it into its config schema."""
        return f"{self.args_model.__module__}.{self.args_model.__qualname__}"

    def get_adapter_capabilities(self) -> list[AdapterCapabilities]:
        """Register ``adapter: <name>``: not LoRA-like (axolotl must not build a LoraConfig), no ReLoRA."""
        return [AdapterCapabilities(name=self.spec.name, lora_like=False, relora=False)]

    def build_peft_config(self, cfg: Any, model: Any = None) -> PeftConfig:
        """The method's ``PeftConfig`` from the validated axolotl config (task type from ``model``)."""
        return peft_config_from_cfg(self.spec, cfg, model)

    def _saved_config(self, adapter_dir: str) -> PeftConfig:
        if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
            raise FileNotFoundError(
                f"lora_model_dir={adapter_dir!r} holds no adapter_config.json. Point it at the output_dir of an "
                f"`adapter: {self.spec.name}` run (or remove it to start a new adapter)."
            )
        saved = PeftConfig.from_pretrained(adapter_dir)
        if not isinstance(saved, self.spec.config_cls):
            raise ValueError(
                f"lora_model_dir={adapter_dir!r} holds a {saved.peft_type} adapter, but `adapter: {self.spec.name}` "
                f"expects a {self.spec.config_cls.__name__}. Set `adapter:` to match the saved adapter."
            )
        return saved

    def load_adapter(
        self, model: Any, cfg: Any, inference: bool = False, config_only: bool = False
    ) -> tuple[Any, PeftConfig] | None:
        """Wrap ``model`` in a ``PeftModel`` of this method (or return only the config for RL trainers).

        A saved adapter in ``lora_model_dir`` is loaded with its own config (selection
        indices included), trainable unless ``inference``. Returns ``None`` for other adapters
        so axolotl asks the next plugin.
        """
        if _cfg_get(cfg, "adapter") != self.spec.name:
            return None
        adapter_dir = _cfg_get(cfg, "lora_model_dir")
        if adapter_dir:
            config = self._saved_config(adapter_dir)
            differing = []
            for name in sorted(self.spec.config_fields()):
                wanted = _cfg_get(cfg, f"{self.spec.key_prefix}{name}")
                saved = getattr(config, name, None)
                if wanted is not None and _normalised(wanted) != _normalised(saved):
                    differing.append(f"{self.spec.key_prefix}{name}: saved {saved!r}, YAML {wanted!r}")
            if differing:
                LOG.warning(
                    "Loading the saved %s adapter from %s; its own settings win over the YAML's: %s",
                    self.spec.name,
                    adapter_dir,
                    "; ".join(differing),
                )
            if config_only:
                return None, config
            LOG.info("Loading %s adapter from %s (trainable=%s)", self.spec.name, adapter_dir, not inference)
            peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=not inference)
        else:
            config = self.build_peft_config(cfg, model)
            if config_only:
                return None, config
            peft_model = get_peft_model(model, config)
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            peft_model.print_trainable_parameters()
        return peft_model, config

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        """RL runs: make the final save adapter-only, as it is for SFT.

        For DPO/IPO/KTO, TRL wraps the policy itself, and axolotl's final save
        (``train.save_trained_model``) calls ``save_pretrained`` on the PeftModel *and* on the
        unwrapped base model. The latter writes the whole model with PEFT-internal names
        (``...q_proj.base_layer.weight``, ``...neuroada_theta.default``): a full-size file no
        loader can read, next to the adapter. Pointing that one model instance's
        ``save_pretrained`` at the PeftModel's makes the second save rewrite the same adapter.
        """
        if _cfg_get(cfg, "adapter") != self.spec.name or not _cfg_get(cfg, "rl"):
            return
        peft_model = getattr(trainer, "model", None)
        if not isinstance(peft_model, PeftModel) or not isinstance(
            peft_model.peft_config.get(peft_model.active_adapter), self.spec.config_cls
        ):
            return
        base_model = peft_model.get_base_model()
        if base_model is peft_model:
            return

        def save_adapter_only(save_directory: str, *args: Any, **kwargs: Any) -> None:
            LOG.info("Saving the %s adapter (adapter-only) to %s", self.spec.name, save_directory)
            peft_model.save_pretrained(save_directory, safe_serialization=kwargs.get("safe_serialization", True))

        base_model.save_pretrained = save_adapter_only

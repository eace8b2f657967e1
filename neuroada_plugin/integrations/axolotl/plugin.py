"""The Axolotl plugin: ``adapter: <method>`` for every registered method of this package.

``load_adapter`` returns a real ``PeftModel`` (from ``get_peft_model``, or
``PeftModel.from_pretrained`` when ``lora_model_dir`` is set): saving is then adapter-only in
the PEFT format and ``merge_and_unload`` works. With ``config_only=True`` (DPO/IPO/KTO) it
returns just the config and TRL wraps the policy itself.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from axolotl.integrations.base import AdapterCapabilities, BasePlugin
from axolotl.utils.logging import get_logger
from peft import PeftConfig, PeftModel, get_peft_model

from ...kit.adapter_dtype import restore_adapter_dtypes
from ...registry import MethodSpec
from .args import build_args_model, exposed_fields, registered_specs, yaml_key
from .quantized import install_quantized_loading, prepare_quantized_model
from .safe_args import SafeArgs, safe_callbacks
from .validation import ValidatedMethodArgs, cfg_get, peft_config_from_cfg

__all__ = ["MethodArgs", "MethodsPlugin"]

LOG = get_logger(__name__)

# transformers.TrainingArguments' seed when the YAML sets none: the trainer seeds everything with it.
_TRAINER_DEFAULT_SEED = 42


def seed_adapter_init(cfg: Any) -> int:
    """Seed torch's generators with the run's ``seed`` before a new adapter draws its random tensors.

    Axolotl seeds only when the trainer is built, after the adapter exists, so a method with a random
    init (NEAT's ``A``, SMoA's factors) drew it from whatever state the generators were left in by
    loading: ``seed: 0`` did not reproduce a run, and the same YAML trained differently each time.
    Returns the seed used (the YAML's, else the trainer's default, which is the one it will use).
    """
    seed = cfg_get(cfg, "seed")
    seed = _TRAINER_DEFAULT_SEED if seed is None else int(seed)
    torch.manual_seed(seed)
    return seed


class _PluginArgsBase(ValidatedMethodArgs, SafeArgs):
    """The methods' validators and SAFE's keys (``safe``, ``safe_<field>``) with theirs."""


# Every registered method's YAML keys, generated from the config dataclasses when Axolotl
# imports this module (methods registered through the registry's extension points included),
# plus SAFE's keys, which apply to any adapter (``adapter: lora`` too).
MethodArgs = build_args_model(registered_specs(), base=_PluginArgsBase, module=__name__)


def _normalised(value: Any) -> Any:
    """Lists and sets compare as sorted lists (PEFT stores target_modules as a set)."""
    if isinstance(value, (list, set, tuple)):
        return sorted(value, key=repr)
    return value


class MethodsPlugin(BasePlugin):
    """Axolotl plugin offering ``adapter: <name>`` for each method in the registry.

    Only the hooks an adapter needs are implemented: the args model, the adapter
    capabilities and the loader, plus SAFE's callback (``safe: true``, any adapter, LoRA
    included). Everything else (training, saving, merge-lora's legacy path)
    is Axolotl's own code acting on the returned ``PeftModel``.
    """

    args_model: type = MethodArgs

    def get_input_args(self) -> str:
        """Dotted path of the args model; axolotl imports it and mixes it into its config schema."""
        return f"{self.args_model.__module__}.{self.args_model.__qualname__}"

    def get_adapter_capabilities(self) -> list[AdapterCapabilities]:
        """One adapter name per method: not LoRA-like (axolotl must not build a LoraConfig), no ReLoRA."""
        return [AdapterCapabilities(name=spec.name, lora_like=False, relora=False) for spec in self._specs()]

    def _specs(self) -> tuple[MethodSpec, ...]:
        return self.args_model.peft_methods

    def register(self, cfg: Any) -> None:
        """QLoRA-style loading: axolotl quantizes (``load_in_4bit``/``load_in_8bit``) for lora/qlora only."""
        install_quantized_loading(spec for spec in self._specs() if spec.quantized_layers)

    def pre_lora_load(self, cfg: Any, model: Any) -> None:
        """On a quantized base, ``prepare_model_for_kbit_training`` before the adapter is created (as for QLoRA)."""
        message = prepare_quantized_model(self._specs(), cfg, model)
        if message and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print(message)  # like print_trainable_parameters: plugin loggers have no handler in axolotl

    def _spec_for(self, cfg: Any) -> MethodSpec | None:
        adapter = cfg_get(cfg, "adapter")
        return next((spec for spec in self._specs() if spec.name == adapter), None)

    def build_peft_config(self, cfg: Any, model: Any = None) -> PeftConfig:
        """The selected method's ``PeftConfig`` from the validated axolotl config (task type from ``model``)."""
        spec = self._spec_for(cfg)
        if spec is None:
            raise ValueError(f"`adapter: {cfg_get(cfg, 'adapter')}` is not one of {[s.name for s in self._specs()]}.")
        return peft_config_from_cfg(spec, cfg, model)

    def _saved_config(self, spec: MethodSpec, adapter_dir: str) -> PeftConfig:
        if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
            raise FileNotFoundError(
                f"lora_model_dir={adapter_dir!r} holds no adapter_config.json. Point it at the output_dir of an "
                f"`adapter: {spec.name}` run (or remove it to start a new adapter)."
            )
        saved = PeftConfig.from_pretrained(adapter_dir)
        config_cls = spec.config_class()
        if not isinstance(saved, config_cls):
            raise ValueError(
                f"lora_model_dir={adapter_dir!r} holds a {saved.peft_type} adapter, but `adapter: {spec.name}` "
                f"expects a {config_cls.__name__}. Set `adapter:` to match the saved adapter."
            )
        return saved

    def _warn_if_yaml_differs(self, spec: MethodSpec, cfg: Any, config: PeftConfig, adapter_dir: str) -> None:
        differing = []
        for field in exposed_fields(spec):
            key = yaml_key(spec, field.name)
            wanted, saved = cfg_get(cfg, key), getattr(config, field.name, None)
            if wanted is not None and _normalised(wanted) != _normalised(saved):
                differing.append(f"{key}: saved {saved!r}, YAML {wanted!r}")
        if differing:
            LOG.warning(
                "Loading the saved %s adapter from %s; its own settings win over the YAML's: %s",
                spec.name,
                adapter_dir,
                "; ".join(differing),
            )

    def load_adapter(
        self, model: Any, cfg: Any, inference: bool = False, config_only: bool = False
    ) -> tuple[Any, PeftConfig] | None:
        """Wrap ``model`` in a ``PeftModel`` of the selected method (or return only the config for RL trainers).

        A saved adapter in ``lora_model_dir`` is loaded with its own config (and, for NeuroAda,
        its selection indices), trainable unless ``inference``. Returns ``None`` for adapters
        of other plugins so axolotl asks the next one.
        """
        spec = self._spec_for(cfg)
        if spec is None:
            return None
        adapter_dir = cfg_get(cfg, "lora_model_dir")
        if adapter_dir:
            config = self._saved_config(spec, adapter_dir)
            self._warn_if_yaml_differs(spec, cfg, config, adapter_dir)
            if config_only:
                return None, config
            LOG.info("Loading %s adapter from %s (trainable=%s)", spec.name, adapter_dir, not inference)
            peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=not inference)
        else:
            config = peft_config_from_cfg(spec, cfg, model)
            seed_adapter_init(cfg)  # RL: TRL creates the adapter next, from this state
            if config_only:
                return None, config
            peft_model = get_peft_model(model, config)
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            peft_model.print_trainable_parameters()
        return peft_model, config

    def post_trainer_create(self, cfg: Any, trainer: Any) -> None:
        """Undo TRL's bf16 cast of the adapter on a quantized base; RL runs: make the final save adapter-only.

        TRL casts the trainable parameters of a 4-bit/8-bit model to bf16 when it builds its trainer
        (kit/adapter_dtype.py); here, before ``train()`` wraps the model for DDP, they get back the
        dtype the adapter config chose (``neuroada_theta_dtype``, else float32), on every rank.

        For DPO/IPO/KTO, TRL wraps the policy itself, and axolotl's final save
        (``train.save_trained_model``) calls ``save_pretrained`` on the PeftModel *and* on the
        unwrapped base model. The latter writes the whole model with PEFT-internal names
        (``...q_proj.base_layer.weight``, ``...neuroada_theta.default``): a full-size file no
        loader can read, next to the adapter. Pointing that one model instance's
        ``save_pretrained`` at the PeftModel's makes the second save rewrite the same adapter.
        """
        spec = self._spec_for(cfg)
        if spec is not None and getattr(trainer, "model", None) is not None:
            restored = restore_adapter_dtypes(trainer.model)
            if restored and int(os.environ.get("LOCAL_RANK", "0")) == 0:
                LOG.info("Restored the dtype the %s config asks for on %d adapter tensors", spec.name, restored)
        if spec is None or not cfg_get(cfg, "rl"):
            return
        peft_model = getattr(trainer, "model", None)
        if not isinstance(peft_model, PeftModel) or not isinstance(
            peft_model.peft_config.get(peft_model.active_adapter), spec.config_class()
        ):
            return
        base_model = peft_model.get_base_model()
        if base_model is peft_model:
            return

        def save_adapter_only(save_directory: str, *args: Any, **kwargs: Any) -> None:
            LOG.info("Saving the %s adapter (adapter-only) to %s", spec.name, save_directory)
            peft_model.save_pretrained(save_directory, safe_serialization=kwargs.get("safe_serialization", True))

        base_model.save_pretrained = save_adapter_only

    def add_callbacks_post_trainer(self, cfg: Any, trainer: Any) -> list:
        """``safe: true``: ``SAFECallback`` with the ``safe_*`` settings, for whichever adapter trains (LoRA too).

        Axolotl calls this for every plugin listed under ``plugins:`` and adds the returned callbacks
        to the trainer (``trainer.add_callback``), so the callback sees ``on_train_begin`` with the
        trainer's (PEFT) model.
        """
        callbacks = safe_callbacks(cfg)
        if callbacks and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print(f"[SAFE] callback added for `adapter: {cfg_get(cfg, 'adapter')}`: {callbacks[0].config}")
        return callbacks

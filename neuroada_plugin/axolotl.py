"""Axolotl plugin for NeuroAda: ``adapter: neuroada`` in an Axolotl YAML.

Usage (see ``axolotl_configs/README.md``)::

    plugins:
      - neuroada_plugin.axolotl.NeuroAdaPlugin
    adapter: neuroada
    neuroada_top_k: 1

All the machinery is method-agnostic and lives in :mod:`neuroada_plugin.integrations.axolotl`;
this module only declares NeuroAda's YAML keys. Every key defaults to ``None``, meaning
"``NeuroAdaConfig``'s default", so defaults are defined once, in the config class.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, StrictBool, StrictInt

from .integrations.axolotl import PeftMethodArgs, PeftMethodPlugin, PeftMethodSpec
from .neuroada import NeuroAdaConfig
from .neuroada.config import SELECTIONS, THETA_DTYPES

__all__ = ["NEUROADA_SPEC", "NeuroAdaArgs", "NeuroAdaPlugin"]

NEUROADA_SPEC = PeftMethodSpec(
    name="neuroada",
    config_cls=NeuroAdaConfig,
    key_prefix="neuroada_",
    quantization_hint=(
        "NeuroAda selects the top-k |W| connections of every neuron from the exact floating-point weight and "
        "merges into it"
    ),
)


class NeuroAdaArgs(PeftMethodArgs):
    """The ``neuroada_*`` keys of an Axolotl config (each maps to the ``NeuroAdaConfig`` field of that name)."""

    peft_method: ClassVar[PeftMethodSpec] = NEUROADA_SPEC

    neuroada_top_k: StrictInt | None = Field(
        default=None,
        ge=1,
        description="Input connections trained per output neuron (default 1, the paper's ~0.02% setting; 20: ~0.4%).",
    )
    neuroada_target_modules: list[str] | str | None = Field(
        default=None,
        description=(
            "Modules to adapt: list of names (exact or suffix match) or a regex string. Default: attention and "
            "MLP projections of every layer; 'all-linear' adapts every linear layer except the output head."
        ),
    )
    neuroada_exclude_modules: list[str] | str | None = Field(
        default=None, description="Modules never to adapt: list of names or a regex string."
    )
    neuroada_layers_to_transform: list[StrictInt] | StrictInt | None = Field(
        default=None, description="Only adapt these layer indices (optionally with neuroada_layers_pattern)."
    )
    neuroada_layers_pattern: list[str] | str | None = Field(
        default=None, description="Name of the ModuleList holding the layers, e.g. 'layers'."
    )
    neuroada_selection: Literal[SELECTIONS] | None = Field(  # type: ignore[valid-type]
        default=None,
        description="'magnitude' (default, the paper): top-|W| per neuron; 'smallest' and seeded 'random' are ablations.",
    )
    neuroada_seed: StrictInt | None = Field(default=None, description="Seed of selection='random'.")
    neuroada_theta_dtype: Literal[THETA_DTYPES] | None = Field(  # type: ignore[valid-type]
        default=None,
        description=(
            "Dtype of the trainable values. Unset: PEFT's adapter-dtype autocast decides (float32, also on a bf16 "
            "base: tiny updates survive); a dtype pins it."
        ),
    )
    neuroada_init_weights: StrictBool | None = Field(
        default=None, description="true (default): zero-initialised theta, the model starts as the base model."
    )
    neuroada_modules_to_save: list[str] | None = Field(
        default=None,
        description="Extra modules trained in full and saved with the adapter (lora_modules_to_save is honoured too).",
    )


class NeuroAdaPlugin(PeftMethodPlugin):
    """Axolotl plugin providing ``adapter: neuroada`` (SFT and RL trainers, adapter-only saves, merge-lora)."""

    spec: ClassVar[PeftMethodSpec] = NEUROADA_SPEC
    args_model: ClassVar[type[PeftMethodArgs]] = NeuroAdaArgs

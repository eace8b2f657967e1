"""NeFT (Xu et al., COLING 2025, arXiv 2403.11621): neuron-level fine-tuning as a PEFT method.

Whole neurons (rows of ``up_proj``, columns of ``down_proj``) are trained, chosen under one global budget
by how far a short fine-tuning on the user's data turns them (``neuroada-plugin neft-select``). Only the
selected neurons' values are trainable, as a bypass; merging writes them into the weight exactly.

Importing this package only registers the method's spec (no PEFT, no torch). The classes are loaded on
first access (``from neuroada_plugin.neft import NeftConfig``).
"""

from __future__ import annotations

from .._lazy import lazy_exports
from ..registry import MethodSpec, register

__all__ = ["NeftConfig", "NeftLayer", "NeftModel"]

register(
    MethodSpec(
        name="neft",
        title="NeFT",
        config="neuroada_plugin.neft.config:NeftConfig",
        tuner="neuroada_plugin.neft.model:NeftModel",
        checkpoint_rule="neuroada_plugin.neft.checkpoint:neft_checkpoint_rule",
        summary="NeFT: trains whole neurons (up_proj rows, down_proj columns) picked by neft-select (exact merge).",
        needs_float_weights=True,
        reads_weights_when_created=True,
        reads_weights_in_forward=False,
        exact_merge=True,
        supports_sharding=False,
        data_free_settings=(("selection", "magnitude"), ("neuron_share", 0.004)),
        # neurons_per_module is filled in when the adapter is created, never set by hand: not a YAML key or flag.
        exposed_fields=(
            "selection", "selection_file", "num_neurons", "neuron_share", "target_modules", "column_modules",
            "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save", "seed", "init_weights",
        ),  # fmt: skip
        cli_commands=("neuroada_plugin.neft.cli:register",),
    )
)

_LAZY = {"NeftConfig": "config", "NeftLayer": "layer", "NeftModel": "model"}
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, needs_peft=set(_LAZY))

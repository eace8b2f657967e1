"""Streaming merge of saved adapters into base checkpoints (``neuroada-merge``), method-agnostic.

>>> from neuroada_plugin.merge import merge_adapter_checkpoint
>>> merge_adapter_checkpoint("base_dir", "adapter_dir", "merged_dir")  # doctest: +SKIP

Each PEFT method contributes a checkpoint rule (see :mod:`.registry`); NeuroAda's is in
:mod:`neuroada_plugin.neuroada.checkpoint`.
"""

from .errors import CheckpointFileError, InsufficientSpaceError, OutputExistsError, UnsupportedAdapterError
from .registry import (
    AdapterCheckpoint,
    BaseTensorInfo,
    TensorPatch,
    get_checkpoint_rule,
    register_checkpoint_rule,
    registered_checkpoint_rules,
)
from .streaming import MergeReport, merge_adapter_checkpoint

__all__ = [
    "AdapterCheckpoint",
    "BaseTensorInfo",
    "CheckpointFileError",
    "InsufficientSpaceError",
    "MergeReport",
    "OutputExistsError",
    "TensorPatch",
    "UnsupportedAdapterError",
    "get_checkpoint_rule",
    "merge_adapter_checkpoint",
    "register_checkpoint_rule",
    "registered_checkpoint_rules",
]

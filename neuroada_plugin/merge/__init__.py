"""Streaming merge of saved adapters into base checkpoints (``neuroada-plugin merge``), method-agnostic.

>>> from neuroada_plugin.merge import merge_adapter_checkpoint
>>> merge_adapter_checkpoint("base_dir", "adapter_dir", "merged_dir")  # doctest: +SKIP

Modules: :mod:`.sources` (inputs), :mod:`.plan` (validated plan), :mod:`.writer` (atomic output),
:mod:`.streaming` (the whole merge), :mod:`.rules` (the contract with each method's rule, found
through :mod:`neuroada_plugin.registry`), :mod:`.verify` (compare with PEFT's in-memory merge).
The merge needs torch, never PEFT or Transformers; importing this package imports neither (names
load on first access, so ``python -m neuroada_plugin.merge --help`` starts at once).
"""

from __future__ import annotations

from .._lazy import lazy_exports
from .errors import CheckpointFileError, InsufficientSpaceError, OutputExistsError, UnsupportedAdapterError

_LAZY = {
    "AdapterModule": "rules",
    "BaseTensorInfo": "rules",
    "CheckpointRule": "rules",
    "TensorPatch": "rules",
    "get_checkpoint_rule": "rules",
    "AdapterCheckpoint": "sources",
    "BaseCheckpoint": "sources",
    "MergeReport": "streaming",
    "merge_adapter_checkpoint": "streaming",
}

__all__ = [
    "AdapterCheckpoint",
    "AdapterModule",
    "BaseCheckpoint",
    "BaseTensorInfo",
    "CheckpointFileError",
    "CheckpointRule",
    "InsufficientSpaceError",
    "MergeReport",
    "OutputExistsError",
    "TensorPatch",
    "UnsupportedAdapterError",
    "get_checkpoint_rule",
    "merge_adapter_checkpoint",
]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

"""Method-agnostic contract between the streaming merge engine and each PEFT method.

The engine (:mod:`.streaming`) knows how to read checkpoints, stream shards and write the
output atomically; it knows nothing about any adapter's math. For each ``peft_type`` a
*checkpoint rule* turns an adapter's tensors into :class:`TensorPatch` objects: "base tensor
``name`` becomes ``apply(old value)``", plus a ``check`` run against the base tensor's shape
and dtype during validation, before anything is written.

Rules register with :func:`register_checkpoint_rule`. Built-in methods follow a convention
instead of being listed here: the rule for ``peft_type`` ``FOO`` lives in
``neuroada_plugin/foo/checkpoint.py`` and registers itself on import; :func:`get_checkpoint_rule`
imports that module on first use. A new method therefore plugs in without touching this file.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from .errors import UnsupportedAdapterError

__all__ = [
    "AdapterCheckpoint",
    "BaseTensorInfo",
    "CheckpointRule",
    "TensorPatch",
    "get_checkpoint_rule",
    "register_checkpoint_rule",
    "registered_checkpoint_rules",
]


@dataclass(frozen=True)
class BaseTensorInfo:
    """What validation may know about a base tensor without reading its values."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype | None  # None: a dtype this torch cannot represent (never patchable)
    file: Path


@dataclass
class AdapterCheckpoint:
    """A loaded adapter: its config and its tensors, keys normalised to base-model tensor paths.

    ``tensors`` keys carry no ``base_model.model.`` prefix, e.g.
    ``model.layers.0.self_attn.q_proj.neuroada_theta``; adapters are small, so all tensors are
    in memory.
    """

    path: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    weights_file: Path

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", "")).upper()


@dataclass
class TensorPatch:
    """A change to one base tensor.

    Attributes:
        target: Name of the base tensor (as in the checkpoint's index).
        sources: Adapter keys this patch consumes (for error messages and the unused-key check).
        apply: Returns the new value of the tensor given its old value (same shape and dtype;
            it may modify its argument in place). Must raise rather than write non-finite values.
        check: Raises :class:`~neuroada_plugin.errors.AdapterCheckpointError` when the base tensor
            (shape, dtype) cannot take this patch. Runs before any output is written.
        description: Short human-readable summary for logs, e.g. ``"neuroada k=8"``.
    """

    target: str
    sources: tuple[str, ...]
    apply: Callable[[torch.Tensor], torch.Tensor]
    check: Callable[[BaseTensorInfo], None] = field(default=lambda info: None)
    description: str = ""


class CheckpointRule(Protocol):
    """Turns an adapter into patches. Raise ``AdapterCheckpointError`` for malformed adapters.

    ``base_tensors`` maps every base tensor name to its info, so a rule can check that the
    tensors it targets exist and explain mismatches with both shapes.
    """

    def __call__(self, adapter: AdapterCheckpoint, base_tensors: Mapping[str, BaseTensorInfo]) -> list[TensorPatch]: ...


_RULES: dict[str, CheckpointRule] = {}


def register_checkpoint_rule(peft_type: str, rule: CheckpointRule) -> None:
    """Register (or replace) the checkpoint rule for ``peft_type`` (case-insensitive)."""
    _RULES[peft_type.upper()] = rule


def registered_checkpoint_rules() -> dict[str, CheckpointRule]:
    """Rules registered so far in this process: peft_type -> rule."""
    return dict(_RULES)


def get_checkpoint_rule(peft_type: str) -> CheckpointRule:
    """The rule for ``peft_type``; imports ``neuroada_plugin.<type>.checkpoint`` on first use."""
    key = peft_type.upper()
    if key not in _RULES and key.isidentifier():
        try:
            importlib.import_module(f"neuroada_plugin.{key.lower()}.checkpoint")
        except ModuleNotFoundError as error:
            if not (error.name or "").startswith(f"neuroada_plugin.{key.lower()}"):
                raise
    if key not in _RULES:
        known = ", ".join(sorted(_RULES)) or "none"
        hint = (
            " For LoRA-family adapters use PEFT itself: PeftModel.from_pretrained(...).merge_and_unload() "
            "then save_pretrained()."
            if key in {"LORA", "ADALORA", "LOHA", "LOKR", "IA3", "OFT", "BOFT", "DORA"}
            else ""
        )
        raise UnsupportedAdapterError(
            f"No streaming merge rule is registered for peft_type {peft_type!r} (known: {known}).{hint}"
        )
    return _RULES[key]

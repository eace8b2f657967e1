"""The contract between the streaming merge engine and each method's checkpoint rule.

The engine (:mod:`.streaming`, with :mod:`.sources`, :mod:`.plan`, :mod:`.writer`) reads
checkpoints, groups the adapter's tensors by adapted module, checks them once (one adapter per
file, every float tensor finite) and writes the output atomically; it knows nothing about any
method's math. A method's *checkpoint rule*, named by its :class:`~neuroada_plugin.registry.MethodSpec`
(``checkpoint_rule="pkg.module:function"``), turns ONE module's tensors into
:class:`TensorPatch` objects ("base tensor ``name`` becomes ``apply(old value)``"), each with a
``check`` run against the base tensor's shape and dtype before anything is written::

    def my_rule(module: AdapterModule, base_tensors: Mapping[str, BaseTensorInfo]) -> list[TensorPatch]:
        delta = module.tensors["delta"]               # "<module>.mymethod_delta" in the file
        return [TensorPatch(target=f"{module.module}.weight", apply=lambda w: w.add_(delta.to(w.dtype)))]

A rule's module must not import PEFT or Transformers (the merge CLI runs without them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ..errors import AdapterCheckpointError
from ..kit.fingerprint import BaseMismatchError, fingerprint_distance, weight_fingerprint
from ..kit.quantized import recorded_quantization
from ..registry import MethodSpec, UnknownMethodError, method_for_peft_type, methods
from .errors import UnsupportedAdapterError

__all__ = [
    "FINGERPRINT_PARAM",
    "AdapterModule",
    "BaseTensorInfo",
    "CheckpointRule",
    "TensorPatch",
    "REPRODUCED_TOLERANCE",
    "check_float_base",
    "check_reproducible",
    "expect_tensors",
    "get_checkpoint_rule",
    "method_for_adapter",
    "trained_against",
]


@dataclass(frozen=True)
class BaseTensorInfo:
    """What validation may know about a base tensor without reading its values."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype | None  # None: a dtype this torch cannot represent (never patchable)
    file: Path


@dataclass(frozen=True)
class AdapterModule:
    """One adapted module's tensors, as the engine hands them to a rule.

    Attributes:
        module: The base module's path, e.g. ``model.layers.0.self_attn.q_proj``.
        tensors: Parameter name (the method's prefix stripped) -> tensor, e.g.
            ``{"theta": ..., "indices": ...}`` for ``q_proj.neuroada_theta`` / ``q_proj.neuroada_indices``.
        keys: Parameter name -> the key in the adapter file (for messages).
        config: The adapter's ``adapter_config.json``.
        weights_file: The adapter weights file (for messages).
        fingerprint: The base-weight fingerprint the adapter recorded for this module (``None``: not recorded).
            The engine compares it with the base tensor itself; a rule that reconstructs the weight the adapter
            was trained against (a quantized base) may compare it with that too.
        base_mismatch_allowed: The user passed ``--allow-base-mismatch``: a rule's own fingerprint comparison
            reports instead of refusing.
    """

    module: str
    tensors: Mapping[str, torch.Tensor]
    keys: Mapping[str, str]
    config: Mapping[str, Any]
    weights_file: Path
    fingerprint: torch.Tensor | None = None
    base_mismatch_allowed: bool = False

    @property
    def where(self) -> str:
        """``"<weights file>: layer <module>"``: how a message names this module."""
        return f"{self.weights_file}: layer {self.module}"


@dataclass
class TensorPatch:
    """A change to one base tensor.

    Attributes:
        target: Name of the base tensor (as in the checkpoint's index).
        apply: Returns the new value of the tensor given its old value (same shape and dtype;
            it may modify its argument in place). Must raise rather than write non-finite values.
        check: Raises :class:`~neuroada_plugin.errors.AdapterCheckpointError` when the base tensor
            (shape, dtype) cannot take this patch. Runs before any output is written.
        sources: Adapter keys this patch consumes (for messages); the engine fills in the
            module's keys when a rule leaves it empty.
        description: Short human-readable summary for logs, e.g. ``"neuroada k=8"``.
        shape: The tensor's shape after the patch when it changes it (``None``: unchanged). Only the
            engine's own full copies set it, for an adapter that resized the vocabulary; a method's
            rule keeps shapes.
        notes: Numbers ``apply`` measured, for ``merge_info.json`` (``"patch_notes"``: the largest value of each
            key over all patches).
    """

    target: str
    apply: Callable[[torch.Tensor], torch.Tensor]
    check: Callable[[BaseTensorInfo], None] = field(default=lambda info: None)
    sources: tuple[str, ...] = ()
    description: str = ""
    shape: tuple[int, ...] | None = None
    notes: dict[str, float] = field(default_factory=dict)


class CheckpointRule(Protocol):
    """Turns one module's adapter tensors into patches; raises ``AdapterCheckpointError`` for bad ones.

    ``base_tensors`` maps every base tensor name to its info, so a rule can check that the
    tensors it targets exist and explain mismatches with both shapes.
    """

    def __call__(self, module: AdapterModule, base_tensors: Mapping[str, BaseTensorInfo]) -> Iterable[TensorPatch]: ...


# ``<module>.<prefix>fingerprint``: the base weight's fingerprint (neuroada_plugin/kit/fingerprint.py). The
# engine checks it and never hands it to a rule.
FINGERPRINT_PARAM = "fingerprint"


def expect_tensors(
    module: AdapterModule, required: tuple[str, ...], optional: tuple[str, ...] = (), *, spec: MethodSpec
) -> None:
    """Refuse a module whose tensors are not the method's: unknown names, or a required one missing.

    ``required``/``optional``: parameter names without the method's prefix (``("theta", "indices")``).
    """
    method, prefix = spec.display_name, spec.prefix
    unknown = sorted(set(module.tensors) - {*required, *optional})
    if unknown:
        names = ", ".join(f"'{prefix}{name}'" for name in (*required, *optional))
        raise AdapterCheckpointError(
            f"{module.where}: unexpected {method} tensor(s) {[module.keys[name] for name in unknown]}; a {method} "
            f"adapter holds {names} per layer."
        )
    missing = [name for name in required if name not in module.tensors]
    if missing:
        raise AdapterCheckpointError(
            f"{module.where} has no '{prefix}{missing[0]}' entry (only {sorted(module.keys.values())}); the adapter file "
            "is incomplete. Re-save it with save_pretrained."
        )


def check_float_base(info: BaseTensorInfo, *, method: str, module: str) -> None:
    """Refuse a base tensor that is not floating point (a quantized checkpoint): merging writes float entries."""
    if info.dtype is None or not info.dtype.is_floating_point:
        raise AdapterCheckpointError(
            f"{method} layer {module}: base tensor {info.name!r} in {info.file.name} has dtype "
            f"{info.dtype or 'unsupported'}; merging needs a floating-point (unquantized) weight. Merge into the "
            "full-precision original of the model."
        )


# Fingerprint distance within which a re-quantized original counts as the weight the adapter was trained
# against: the same quantization of the same weight gives 0 (or accumulation noise, < 0.01); the
# original itself is 0.05-0.16 from its 4-bit version and ~0.01 from its 8-bit one.
REPRODUCED_TOLERANCE = 0.005


def check_reproducible(module: AdapterModule, *, method: str) -> None:
    """Refuse, before anything is written, a module trained on a quantized base that cannot be reproduced here."""
    if recorded_quantization(module.config, module.module) is None:
        return
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise AdapterCheckpointError(
            f"{method} layer {module.module} was trained on a bitsandbytes-quantized base (adapter_config.json: "
            f"base_quantization). {method}'s update is a function of the frozen weight, so merging it into the "
            "full-precision original re-quantizes each weight the same way to compute the update from the weight "
            "it was trained against, which needs bitsandbytes: pip install bitsandbytes."
        )


def trained_against(module: AdapterModule, weight: torch.Tensor, patch: TensorPatch, *, method: str) -> torch.Tensor:
    """The frozen weight the adapter of ``module`` learned against, given the base tensor ``weight``.

    ``weight`` itself, unless the adapter records that this layer was quantized by bitsandbytes when it
    was trained (``adapter_config.json``: ``base_quantization``): then ``weight`` is quantized with the
    recorded settings and dequantized again, as loading did, and compared with the fingerprint the adapter
    recorded from the weight it trained on (:data:`REPRODUCED_TOLERANCE`; the distance is noted in
    ``patch.notes["reproduced_fingerprint_distance"]``).
    """
    settings = recorded_quantization(module.config, module.module)
    if settings is None:
        return weight
    from ..kit.quantized_write import reproduce_quantized

    reproduced = reproduce_quantized(weight, settings)
    if module.fingerprint is not None:
        distance = fingerprint_distance(module.fingerprint, weight_fingerprint(reproduced))
        key = "reproduced_fingerprint_distance"
        patch.notes[key] = max(distance, patch.notes.get(key, 0.0))
        if distance > REPRODUCED_TOLERANCE and not module.base_mismatch_allowed:
            raise BaseMismatchError(
                f"{module.where}: this {method} adapter was trained on a {settings.get('kind')} quantization of its "
                f"base ({settings}); quantizing this base tensor the same way gives a weight whose fingerprint is "
                f"{distance:.4f} away from the one recorded in training (the same weight gives < "
                f"{REPRODUCED_TOLERANCE}). This is not the checkpoint that was quantized for training (another "
                "revision or dtype?). Merge into the checkpoint the adapter was trained from, or pass "
                "--allow-base-mismatch to merge anyway (the update is then computed from this quantization)."
            )
    return reproduced


_PEFT_ONLY = {"LORA", "ADALORA", "LOHA", "LOKR", "IA3", "OFT", "BOFT", "DORA", "VERA", "FOURIERFT", "BONE", "SHIRA"}


def method_for_adapter(peft_type: str) -> MethodSpec:
    """The registered method whose PEFT type is ``peft_type``; :class:`UnsupportedAdapterError` otherwise."""
    try:
        return method_for_peft_type(peft_type)
    except UnknownMethodError:
        known = ", ".join(f"{spec.name} ({spec.peft_type})" for spec in methods().values()) or "none"
        hint = (
            " For PEFT's own methods (LoRA, ...) use PEFT itself: PeftModel.from_pretrained(...).merge_and_unload() "
            "then save_pretrained()."
            if str(peft_type).upper() in _PEFT_ONLY
            else ""
        )
        raise UnsupportedAdapterError(
            f"No method of neuroada-plugin has peft_type {peft_type!r}, so the streaming merge has no rule for it "
            f"(known methods: {known}).{hint}"
        ) from None


def get_checkpoint_rule(peft_type: str) -> CheckpointRule:
    """The rule of the method whose PEFT type is ``peft_type`` (through the method registry)."""
    spec = method_for_adapter(peft_type)
    rule = spec.merge_rule()
    if rule is None:
        raise UnsupportedAdapterError(
            f"Method {spec.display_name} ({spec.peft_type}) has no streaming merge rule; merge its adapters with "
            "PeftModel.from_pretrained(...).merge_and_unload() then save_pretrained()."
        )
    return rule

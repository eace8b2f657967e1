"""The tuner-layer base every method derives from: a method writes its delta, the skeleton is here.

A method's layer sets ``method_name``, ``adapter_layer_names`` (its trainable tensors, the first one
present for every adapter) and ``other_param_names``, and writes:

* ``update_layer(adapter_name, config, module_name="")``: create the adapter's tensors (and call
  :meth:`MethodLayer.record_fingerprint`);
* ``adapter_output(x, adapter_name)``: what the adapter adds to the base layer's output;
* optionally ``fused_output(x, adapter_name)``: ``base(x) + adapter(x)`` in one pass where that is cheaper
  and computes the same (see :mod:`.fused`), else ``None``;
* ``check_merge_values(adapter_names)``, ``merge_into_weight(adapter_names)``, ``unmerge_from_weight()``:
  its merge arithmetic (:func:`~.merge_checks.checked_finite` refuses NaN/inf with one error type).

The base holds the rest, identical for every method: the forward (adapters disabled, merged,
several active), the merge bookkeeping (only adapters this layer holds; the tuner checks every layer
before any is merged), the frozen weight as the method reads it (gathered under ZeRO-3,
dequantized for bitsandbytes), and the base fingerprint (recorded at creation, compared on load).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..registry import get_method
from .adapter_dtype import restore_layer_dtypes
from .fingerprint import check_loaded_fingerprints, not_recorded, readable_here, weight_fingerprint
from .quantized import bnb_layer_kind, dequantize_weight
from .quantized_write import (
    dequantize_snapshot,
    quantized_snapshot,
    reproduce_quantized,
    restore_quantized,
    set_quantized,
)
from .sharded import full_shape, gathered, is_partitioned

__all__ = ["MethodLayer", "WeightFunctionLayer", "layer_shape"]

_PEFT_MODEL_PREFIX = "base_model.model."


def layer_shape(base: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a linear-like layer: its own features for a quantized layer
    (a packed 4-bit weight is ``[n_bytes, 1]``), the full shape of a ZeRO-3 partition."""
    if bnb_layer_kind(base) is not None:
        return base.out_features, base.in_features
    out_features, in_features = full_shape(base.weight)[-2:]
    return out_features, in_features


class MethodLayer(nn.Module, BaseTunerLayer):
    """Base of every method's tuner layer (see the module docstring)."""

    method_name: ClassVar[str] = ""
    # Whether the forward may use a method's ``fused_output`` (tests set it False to check the separate path).
    fuse_with_base: ClassVar[bool] = True

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        nn.Module.__init__(self)
        self.base_layer = base_layer
        # Per adapter, the fingerprint of the base weight it was created on (kit/fingerprint.py).
        setattr(self, self.fingerprint_name, BufferDict({}, persistent=True))
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        self.out_features, self.in_features = layer_shape(self.get_base_layer())

    @property
    def fingerprint_name(self) -> str:
        return f"{self.method_name}_fingerprint"

    @property
    def fingerprints(self) -> BufferDict:
        return getattr(self, self.fingerprint_name)

    def has_adapter(self, adapter_name: str) -> bool:
        return adapter_name in getattr(self, self.adapter_layer_names[0])

    def layer_name(self, module_name: str = "") -> str:
        return module_name or getattr(self, "_module_name", "") or type(self.get_base_layer()).__name__

    def adapter_init_dtype(self) -> torch.dtype:
        """The dtype new adapter tensors are created in: the base weight's, float32 on a quantized base.

        A bitsandbytes weight is stored as uint8/int8, or as bf16 *storage* of packed 4-bit codes
        (FSDP-QLoRA's ``bnb_4bit_quant_storage``): never the dtype to train in.
        """
        base = self.get_base_layer()
        weight = base.weight
        if bnb_layer_kind(base) is not None or not weight.is_floating_point():
            return torch.float32
        return weight.dtype

    # ---------------------------------------------------------------------------- what a method writes

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        raise NotImplementedError

    def fused_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor | None:
        """``base(x) + adapter_output(x)`` computed together, or ``None`` where this method cannot (default).

        Called only with one active adapter, unmerged, and no extra forward arguments.
        """
        return None

    def check_weight_for_forward(self) -> None:
        """Raise before the forward when the adapters cannot run on the base weight as it is now (default: they can)."""

    def check_merge_values(self, adapter_names: list[str]) -> None:
        """Raise :class:`MergeError` if merging ``adapter_names`` would write NaN/inf; writes nothing."""
        raise NotImplementedError

    def merge_into_weight(self, adapter_names: list[str]) -> None:
        """Write the adapters into the base weight and append them to ``merged_adapters``.

        If any of them fails (NaN/inf), the weight must be left as it was: compute before writing,
        or undo this call's writes.
        """
        raise NotImplementedError

    def unmerge_from_weight(self) -> None:
        """Undo every merge (last merged first) and empty ``merged_adapters``."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------- the skeleton

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        restore_layer_dtypes(self)  # a trainer's bf16 cast on a quantized base (kit/adapter_dtype.py)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if not self.merged:
            self.check_weight_for_forward()
            active = [name for name in self.active_adapters if self.has_adapter(name)]
            if self.fuse_with_base and len(active) == 1 and not args and not kwargs:
                fused = self.fused_output(x, active[0])
                if fused is not None:
                    return fused
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if self.has_adapter(name):
                result = result + self.adapter_output(x, name).to(result.dtype)
        return result

    def _unmerged_adapters(self, adapter_names: list[str] | None) -> list[str]:
        wanted = adapter_names if adapter_names is not None else self.active_adapters
        return [name for name in wanted if self.has_adapter(name) and name not in self.merged_adapters]

    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        """Raise :class:`MergeError` if merging ``adapter_names`` (default: the active ones) would write NaN/inf."""
        names = self._unmerged_adapters(adapter_names)
        if names:
            self.check_merge_values(names)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge into the base weight (``safe_merge`` adds nothing: a failing merge never writes).

        Not checked again here: the tuner ran :meth:`check_merge` on every layer before any merges,
        and :meth:`merge_into_weight` leaves the weight as it was if an adapter fails anyway.
        """
        names = [name for name in check_adapters_to_merge(self, adapter_names) if self.has_adapter(name)]
        if names:
            self.merge_into_weight(names)

    def unmerge(self) -> None:
        if self.merged:
            self.unmerge_from_weight()

    # ---------------------------------------------------------------------------- the frozen weight

    @contextmanager
    def read_weight(self) -> Iterator[torch.Tensor]:
        """The base weight as a full floating-point ``[out, in]`` tensor, to read from for the block.

        Gathered read-only when ZeRO-3 partitioned it (a collective: every rank must read),
        dequantized one layer at a time for a bitsandbytes layer (gathered first under ZeRO-3).
        """
        base = self.get_base_layer()
        if bnb_layer_kind(base) is not None:
            with gathered([base.weight]):  # ZeRO-3 + 4-bit/8-bit: the packed bytes are partitioned too
                weight = dequantize_weight(base)
            try:
                yield weight
            finally:
                del weight
            return
        with gathered([base.weight]):
            yield base.weight

    def record_fingerprint(self, adapter_name: str, config: Any) -> None:
        """Store the fingerprint of the base weight ``adapter_name`` is created on (read here).

        Loading (``inference_mode``) or meta weights: the "not recorded" placeholder, which the file
        being loaded replaces.
        """
        base_weight = self.get_base_layer().weight
        if base_weight.is_meta or getattr(config, "inference_mode", False):
            fingerprint = not_recorded()
        else:
            with self.read_weight() as read:
                fingerprint = weight_fingerprint(read)
        self.fingerprints[adapter_name] = fingerprint.to(base_weight.device)

    def check_loaded_state(self, state_dict: dict[str, torch.Tensor], prefix: str) -> None:
        """A method's checks of the adapter tensors being loaded into this layer (shapes, dtypes)."""

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # Runs before the child containers load their entries: the whole layer is checked first, so a bad
        # file fails with the layer's name, and only then is its base compared with the recorded fingerprint.
        # Dtypes a trainer cast are restored first, so a float32 checkpoint loads without rounding.
        restore_layer_dtypes(self)
        self.check_loaded_state(state_dict, prefix)
        weight = self.get_base_layer().weight
        layer = prefix.removeprefix(_PEFT_MODEL_PREFIX).rstrip(".") or self.layer_name()
        title = get_method(self.method_name).display_name
        check_loaded_fingerprints(
            self,
            state_dict,
            prefix,
            adapter_key=self.adapter_layer_names[0],
            fingerprint_key=self.fingerprint_name,
            read_weight=self.read_weight if readable_here(weight) else None,
            where=f"{title} layer {layer}",
        )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        restore_layer_dtypes(self)  # before the child containers save: the file holds the config's dtype
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)  # PEFT removes it from every container in other_param_names
        if adapter_name in self.fingerprints:
            del self.fingerprints[adapter_name]


class WeightFunctionLayer(MethodLayer):
    """Base of a method whose update is a function of the frozen weight itself (NEAT, SMoA).

    Every merge reads the weight as it was before the first merge, kept from the first merge until
    :meth:`unmerge_from_weight` restores it bit for bit; so a second adapter merged on top still sees
    the original weight. A method writes :meth:`merged_weight`; the merge bookkeeping is here.
    """

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        super().__init__(base_layer, **kwargs)
        self._original_weight: torch.Tensor | None = None
        self._quantized_backup: Any = None  # a bitsandbytes base: the quantized weight from before the first merge
        # Adapter -> the bitsandbytes settings it was trained against, for an adapter trained on a quantized base
        # and used on an unquantized one (set by the tuner from the config's ``base_quantization``).
        self.reproduced_quantization: dict[str, dict[str, Any]] = {}

    def merged_weight(self, current: torch.Tensor, original: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``current`` plus ``adapter_name``'s update computed from ``original``; raises :class:`MergeError` on
        NaN/inf (writes nothing)."""
        raise NotImplementedError

    def pre_merge_weight(self) -> torch.Tensor:
        """The weight before any merge (the base weight itself when nothing is merged)."""
        return self._original_weight if self._original_weight is not None else self.get_base_layer().weight

    def _quantized(self) -> bool:
        return bnb_layer_kind(self.get_base_layer()) is not None

    @contextmanager
    def read_pre_merge_weight(self) -> Iterator[torch.Tensor]:
        """The weight before any merge, readable for the block: the kept copy once merged (dequantized from
        the kept quantized bytes on a bitsandbytes base), else :meth:`read_weight`."""
        if self._quantized() and self._quantized_backup is not None:
            yield dequantize_snapshot(self.get_base_layer(), self._quantized_backup)
        elif self._original_weight is not None:
            yield self._original_weight
        else:
            with self.read_weight() as weight:
                yield weight

    def trained_against(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The frozen weight ``adapter_name``'s update is a function of, given the (pre-merge) base weight.

        ``weight`` itself, unless the adapter was trained on a bitsandbytes-quantized base and this base is
        not quantized: then ``weight`` quantized and dequantized again with the recorded settings, as the
        training base computed with (transient, one layer at a time). So the adapter computes the same update
        on the full-precision original as in training, and as the streaming merge writes.
        """
        settings = self.reproduced_quantization.get(adapter_name)
        return weight if settings is None else reproduce_quantized(weight.detach(), settings)

    @contextmanager
    def read_trained_weight(self, adapter_name: str) -> Iterator[torch.Tensor]:
        """:meth:`read_weight`, as :meth:`trained_against` sees it for ``adapter_name`` (a reader for forward and backward)."""
        with self.read_weight() as weight:
            yield self.trained_against(weight, adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.reproduced_quantization.pop(adapter_name, None)

    def _adapter_params(self, adapter_names: list[str]) -> list[torch.Tensor]:
        containers = [getattr(self, name) for name in self.adapter_layer_names]
        return [c[n] for c in containers for n in adapter_names if n in c]

    def check_merge_values(self, adapter_names: list[str]) -> None:
        with (
            gathered(self._adapter_params(adapter_names)),
            self.read_pre_merge_weight() as original,
            self.read_weight() as current,
            torch.no_grad(),
        ):
            for name in adapter_names:
                current = self.merged_weight(current, self.trained_against(original.detach(), name), name)

    def merge_into_weight(self, adapter_names: list[str]) -> None:
        """Write the adapters into the weight. Under ZeRO-3 the layer's weight (and the adapter's tensors)
        are gathered for the write and rank 0's result written back into every rank's partition; the
        pre-merge copy is then the full weight (kept until :meth:`unmerge_from_weight`). On a bitsandbytes
        base the merged weight is quantized again (a warning: that rounds) and the quantized bytes from
        before the first merge are what is kept."""
        if self._quantized():
            self._merge_into_quantized(adapter_names)
            return
        weight = self.get_base_layer().weight
        with gathered(self._adapter_params(adapter_names)), gathered([weight], modifier_rank=0):
            original = self._original_weight if self._original_weight is not None else weight.data.clone()
            merged = weight.data
            for name in adapter_names:  # every update is computed (and checked) before the weight changes
                with torch.no_grad():
                    merged = self.merged_weight(merged, self.trained_against(original, name), name)
            self._original_weight = original
            _write_weight(weight, merged)
        self.merged_adapters.extend(adapter_names)

    def _merge_into_quantized(self, adapter_names: list[str]) -> None:
        base = self.get_base_layer()
        title = get_method(self.method_name).display_name
        warnings.warn(
            f"Merging {title} adapter(s) {adapter_names} into the {bnb_layer_kind(base)} layer {self.layer_name()}: "
            "the layer is dequantized, updated and quantized again, which rounds (the merged layer is not exactly "
            "base + update; unmerge restores the quantized bytes exactly). For an exact merged checkpoint, merge "
            "into the full-precision original: neuroada-plugin merge --base <original> --adapter <adapter>.",
            UserWarning,
            stacklevel=4,
        )
        with self.read_pre_merge_weight() as original, self.read_weight() as merged, torch.no_grad():
            for name in adapter_names:  # every update is computed (and checked) before the layer changes
                merged = self.merged_weight(merged, original, name)
            snapshot = self._quantized_backup if self._quantized_backup is not None else quantized_snapshot(base)
            set_quantized(base, merged)
        self._quantized_backup = snapshot
        self.merged_adapters.extend(adapter_names)

    def unmerge_from_weight(self) -> None:
        if self._quantized() and self._quantized_backup is not None:
            restore_quantized(self.get_base_layer(), self._quantized_backup)
            self._quantized_backup = None
            self.merged_adapters.clear()
            return
        weight = self.get_base_layer().weight
        with gathered([weight], modifier_rank=0):
            _write_weight(weight, self._original_weight)
        self._original_weight = None
        self.merged_adapters.clear()


def _write_weight(weight: torch.Tensor, values: torch.Tensor) -> None:
    """Replace ``weight``'s values: in place for a gathered ZeRO-3 parameter (its partition is rewritten from
    it when the gather ends), by rebinding ``.data`` otherwise (as before: no copy)."""
    if is_partitioned(weight):
        with torch.no_grad():
            weight.data.copy_(values)
    else:
        weight.data = values

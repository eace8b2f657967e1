"""NeuroAda on bitsandbytes-quantized base layers (QLoRA-style): ``Linear4bit`` (NF4/FP4) and ``Linear8bitLt``.

The frozen weight stays quantized. The forward pass is the base layer's own quantized matmul
plus the sparse bypass, which needs only the layer input, the indices and theta, so nothing
changes there (:class:`~.layer.Linear`'s forward is used as it is). What differs is reading
the weight:

* selection reads the *dequantized* weight, one layer at a time, for the duration of the read
  (:meth:`~neuroada_plugin.kit.layer.MethodLayer.read_weight`); the indices are saved with the adapter as
  always, so the adapter does not depend on the quantization;
* ``merge`` dequantizes the layer, adds theta at the selected entries and re-quantizes it (with a
  warning: re-quantizing rounds, so the merged layer is not exactly base + theta). ``unmerge``
  restores the quantized weight that was there before the merge, byte for byte (it is kept
  until then). For an exact merged checkpoint, merge into the full-precision original with
  ``neuroada-plugin merge --base <original> --adapter <adapter>``.

Reading a quantized weight (both bitsandbytes 4-bit CPU layouts included) is shared machinery:
:mod:`neuroada_plugin.kit.quantized`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..kit.quantized import bnb_layer_kind
from ..kit.quantized_write import quantized_snapshot, restore_quantized, set_quantized
from .config import NeuroAdaConfig
from .layer import Linear
from .validation import merge_values, put_entries_

__all__ = ["Linear4bit", "Linear8bitLt", "QuantizedLinear", "dispatch_bnb"]


class QuantizedLinear(Linear):
    """NeuroAda around a bitsandbytes layer: ``y = base(x) (quantized matmul) + sparse bypass``.

    Re-quantizing a merged weight and keeping what an exact unmerge needs is shared (:mod:`~neuroada_plugin.kit.quantized_write`).
    """

    quantization = ""  # key of SUPPORTED_QUANTIZED_LAYERS

    # -- merging: dequantize, add, re-quantize ------------------------------------------------------------

    def _merge_plan(self, name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Indices, current values and merged values of the entries adapter ``name`` touches in ``weight``
        (the *dequantized* weight: :meth:`read_weight`)."""
        indices = self._checked_indices(name).to(weight.device)
        original = weight.gather(1, indices)
        updated = merge_values(
            original,
            self.neuroada_theta[name].detach().to(weight.device),
            what=f"NeuroAda adapter {name!r} into the {self.quantization} layer {self.layer_name()}",
            outcome="Nothing was merged.",
        )
        return indices, original, updated

    def check_merge_values(self, adapter_names: list[str]) -> None:
        with self.read_weight() as dense:
            for name in adapter_names:
                self._merge_plan(name, dense)

    def merge_into_weight(self, adapter_names: list[str]) -> None:
        """Dequantize, write ``W[i, idx[i, j]] += theta[i, j]``, re-quantize (warns: re-quantizing rounds).

        The quantized weight in place before each merge is kept, so :meth:`unmerge` restores it exactly
        (and a later adapter that fails undoes this call's earlier ones).
        """
        merged_here: list[str] = []
        try:
            for name in adapter_names:
                warnings.warn(
                    f"Merging NeuroAda adapter {name!r} into the {self.quantization} layer {self.layer_name()}: the "
                    "layer is dequantized, updated and re-quantized, which rounds (the merged layer is not exactly "
                    "base + theta). For an exact merge, merge into the full-precision original: neuroada-plugin "
                    "merge --base <original> --adapter <adapter>.",
                    UserWarning,
                    stacklevel=3,
                )
                with self.read_weight() as dense:
                    indices, _, updated = self._merge_plan(name, dense)
                    put_entries_(dense, indices, updated)
                    self._merge_backup[name] = self._quantized_state()
                    self._set_quantized(dense)
                self.merged_adapters.append(name)
                merged_here.append(name)
        except BaseException:
            if merged_here:
                self._restore_quantized(self._merge_backup[merged_here[0]])
                for name in merged_here:
                    self._merge_backup.pop(name, None)
                    self.merged_adapters.remove(name)
            raise

    def unmerge_from_weight(self) -> None:
        """Restore the quantized weight from before the merges, byte for byte."""
        restore, unmerged = None, []
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            unmerged.append(name)
            restore = self._merge_backup.pop(name, restore)
        if restore is not None:
            self._restore_quantized(restore)
            return
        # No pre-merge copy (merged state restored from elsewhere): subtract theta and re-quantize (rounds).
        for name in unmerged:
            if name not in self.neuroada_theta:
                continue
            with self.read_weight() as dense:
                indices = self._checked_indices(name).to(dense.device)
                theta = self.neuroada_theta[name].detach().to(dense.device)
                put_entries_(dense, indices, dense.gather(1, indices).to(theta.dtype) - theta)
                self._set_quantized(dense)

    def _quantized_state(self) -> Any:
        return quantized_snapshot(self.get_base_layer())

    def _set_quantized(self, dense: torch.Tensor) -> None:
        set_quantized(self.get_base_layer(), dense)

    def _restore_quantized(self, state: Any) -> None:
        restore_quantized(self.get_base_layer(), state)


class Linear4bit(QuantizedLinear):
    """NeuroAda around ``bitsandbytes.nn.Linear4bit`` (NF4 or FP4, double quantization or not, any compute dtype)."""

    quantization = "bnb_4bit"


class Linear8bitLt(QuantizedLinear):
    """NeuroAda around ``bitsandbytes.nn.Linear8bitLt`` (LLM.int8())."""

    quantization = "bnb_8bit"


_LAYERS = {"bnb_4bit": Linear4bit, "bnb_8bit": Linear8bitLt}


def dispatch_bnb(
    target: nn.Module, adapter_name: str, config: NeuroAdaConfig, module_name: str = ""
) -> nn.Module | None:
    """The NeuroAda layer for a bitsandbytes ``target``, or ``None`` when it is not one (as PEFT's ``dispatch_bnb_*``)."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    kind = bnb_layer_kind(base)
    if kind is None:
        return None
    return _LAYERS[kind](target, adapter_name, config, module_name=module_name)

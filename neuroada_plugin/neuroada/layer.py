"""NeuroAda tuner layer: a frozen ``nn.Linear`` plus per-neuron sparse trainable bypasses."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..errors import AdapterCheckpointError
from ..kit.fingerprint import check_loaded_fingerprints, not_recorded, readable_here, weight_fingerprint
from ..kit.sharded import agree_across_ranks, full_shape, gathered, is_partitioned
from .config import NeuroAdaConfig
from .csr_bypass import CSR_MIN_K, CsrPattern, csr_path_supported, csr_pattern
from .functional import compact_columns, sparse_bypass
from .selection import select_connections
from .validation import check_fits, check_indices, check_theta, index_span, merge_values, put_entries_

_PEFT_MODEL_PREFIX = "base_model.model."


def theta_dtype(config: NeuroAdaConfig, weight: torch.Tensor) -> torch.dtype:
    """Dtype theta is created in: ``config.theta_dtype`` when set, else the base weight's (PEFT's rule).

    In the second case the tuner's ``_cast_adapter_dtype`` then upcasts bf16/fp16 to float32
    unless the user passed ``autocast_adapter_dtype=False``, exactly as for PEFT's own tuners.
    """
    if config.theta_dtype is not None:
        return config.torch_theta_dtype
    return weight.dtype if weight.dtype.is_floating_point else torch.float32


class NeuroAdaLayer(BaseTunerLayer):
    """State and merge logic shared by NeuroAda layers.

    Per adapter it holds ``neuroada_theta[name]`` (trainable, ``[out, k]``) and
    ``neuroada_indices[name]`` (a persistent ``int64`` buffer ``[out, k]``: the input
    connection of every value). Indices are saved with the adapter, so a loaded adapter
    uses exactly the connections it was trained on.
    """

    adapter_layer_names = ("neuroada_theta",)
    other_param_names = ("neuroada_indices", "neuroada_fingerprint")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.neuroada_theta = nn.ParameterDict({})
        self.neuroada_indices = BufferDict({}, persistent=True)
        # Per adapter, the fingerprint of the base weight it was created on (kit/fingerprint.py).
        self.neuroada_fingerprint = BufferDict({}, persistent=True)
        # Original values of the entries each merged adapter overwrote: unmerge restores
        # them bit for bit instead of subtracting theta (which rounds).
        self._merge_backup: dict[str, torch.Tensor] = {}
        # Adapters whose selection is deferred: PEFT is loading a saved adapter for inference,
        # whose file brings the indices; selection runs only if it does not (first use).
        self._pending_selection: dict[str, NeuroAdaConfig] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        # The full shape, also when ZeRO-3 has partitioned the weight (0 local elements).
        self.out_features, self.in_features = full_shape(self.get_base_layer().weight)

    def update_layer(self, adapter_name: str, config: NeuroAdaConfig, module_name: str = "") -> None:
        """Add adapter ``adapter_name``: select ``config.top_k`` connections per row, zero theta."""
        k = config.top_k
        if k > self.in_features:
            raise ValueError(
                f"NeuroAda top_k={k} exceeds in_features={self.in_features} of layer {module_name or '?'} "
                f"(weight shape {[self.out_features, self.in_features]}). Lower top_k or exclude this layer."
            )
        weight = self.get_base_layer().weight
        theta = torch.zeros(self.out_features, k, dtype=theta_dtype(config, weight), device=weight.device)
        if not config.init_weights:
            # Keyed on the adapter name too, so two adapters made from one config differ (as PEFT's
            # tuners' random inits do), yet every run gives the same values.
            salt = zlib.crc32(f"{adapter_name}\0{module_name}".encode())
            generator = torch.Generator(device="cpu").manual_seed(config.seed + salt)
            theta = (0.02 * torch.randn(self.out_features, k, generator=generator)).to(theta)
        self.neuroada_theta[adapter_name] = nn.Parameter(theta)

        if self.neuroada_theta[adapter_name].is_meta or weight.is_meta:
            # PEFT is loading a saved adapter with low_cpu_mem_usage=True: the file's
            # indices will be assigned, so selection is not run at all.
            indices = torch.empty(self.out_features, k, dtype=torch.int64, device="meta")
            fingerprint = not_recorded().to("meta")
        elif config.inference_mode:
            # PeftModel.from_pretrained (inference): the file's indices overwrite this
            # placeholder; -1 makes a file that somehow captured it fail validation loudly.
            indices = torch.full((self.out_features, k), -1, dtype=torch.int64, device=weight.device)
            fingerprint = not_recorded().to(weight.device)  # the file's, or "not recorded" for an older file
            self._pending_selection[adapter_name] = config
        else:
            indices, fingerprint = self._select(config, module_name)
        self.neuroada_indices[adapter_name] = indices
        self.neuroada_fingerprint[adapter_name] = fingerprint
        self.set_adapter(self.active_adapters)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """Move the adapter to the base layer's device without changing any dtype.

        PEFT's default also casts to the base dtype; that would turn fp32 theta into bf16
        and (peft <= 0.20) the integer indices into floats.
        """
        target = device if device is not None else self.get_base_layer().weight.device
        if target.type == "meta":
            return
        for container in (self.neuroada_theta, self.neuroada_indices, self.neuroada_fingerprint):
            if adapter_name in container and not container[adapter_name].is_meta:
                value = container[adapter_name]
                if isinstance(value, nn.Parameter):
                    container[adapter_name] = nn.Parameter(value.to(target), requires_grad=value.requires_grad)
                else:
                    container[adapter_name] = value.to(target)

    def _layer_name(self) -> str:
        return getattr(self, "_neuroada_module_name", "") or type(self.get_base_layer()).__name__

    def _resolve_pending_selection(self) -> None:
        """Run the deferred selections that no loaded file supplied (from the unmerged weight)."""
        for name, config in list(self._pending_selection.items()):
            indices, fingerprint = self._select(config, getattr(self, "_neuroada_module_name", ""))
            self.neuroada_indices[name], self.neuroada_fingerprint[name] = indices, fingerprint
            del self._pending_selection[name]

    def _select(self, config: NeuroAdaConfig, module_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices ``[out, k]`` selected from the full base weight, and that weight's fingerprint.

        With a ZeRO-3 partitioned weight the gather in :meth:`_weight_for_reading` is a collective
        that every rank enters, and rank 0's indices are then broadcast so that all ranks hold
        identical indices by construction (not only by deterministic selection).
        """
        with self._weight_for_reading() as weight:
            indices = select_connections(weight, config.top_k, config.selection, seed=config.seed, salt=module_name)
            fingerprint = weight_fingerprint(weight).to(indices.device)
        base_weight = self.get_base_layer().weight
        if is_partitioned(base_weight):
            indices = agree_across_ranks(indices, like=base_weight, where=module_name or self._layer_name())
        return indices, fingerprint

    @contextmanager
    def _weight_for_reading(self) -> Iterator[torch.Tensor]:
        """The base weight as a full floating-point ``[out, in]`` tensor, to read from (selection).

        The one place that knows how the base layer stores its weight: selection never reads
        ``base_layer.weight`` directly, so sharded (ZeRO-3) or quantized base layers only need
        to extend this (gather one layer / dequantize one layer, for the duration of the read).
        A ZeRO-3 partitioned weight is gathered read-only (a collective: every rank must read).
        """
        weight = self.get_base_layer().weight
        with gathered([weight]):
            yield weight

    def _checked_indices(self, adapter_name: str) -> torch.Tensor:
        if self._pending_selection:
            self._resolve_pending_selection()
        indices = self.neuroada_indices[adapter_name]
        if indices.is_meta:
            raise AdapterCheckpointError(
                f"NeuroAda layer {self._layer_name()}: adapter {adapter_name!r} has no connection indices. The "
                "adapter file was loaded with low_cpu_mem_usage=True but contains no 'neuroada_indices' entry "
                "for this layer; re-save the adapter with neuroada_plugin."
            )
        return indices

    def _derived_from_indices(self, adapter_name: str, kind: str, build: Callable[[], Any]) -> Any:
        """``build()`` computed once per indices tensor of ``adapter_name`` (``kind`` names the result).

        Keyed by the tensor's storage, version and device, so a reload, an in-place edit or a
        device move recomputes it (``torch.unique`` and sorting synchronise a GPU: not once per step).
        """
        indices = self.neuroada_indices[adapter_name]
        cache = self.__dict__.setdefault("_neuroada_indices_cache", {})
        key = (indices.data_ptr(), indices._version, indices.device, tuple(indices.shape))
        cached = cache.get((adapter_name, kind))
        if cached is None or cached[0] != key:
            cached = (key, build())
            cache[(adapter_name, kind)] = cached
        return cached[1]

    def _compact_columns(self, adapter_name: str, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """:func:`compact_columns` of the adapter's indices (cached)."""
        return self._derived_from_indices(adapter_name, "compact", lambda: compact_columns(indices, self.in_features))

    def _csr_pattern(self, adapter_name: str, indices: torch.Tensor) -> CsrPattern:
        """:func:`csr_pattern` of the adapter's indices, over its compact columns (cached)."""
        compact = self._compact_columns(adapter_name, indices)
        return self._derived_from_indices(adapter_name, "csr", lambda: csr_pattern(indices, self.in_features, compact))

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense ``[out, in]`` update of ``adapter_name`` (in theta's dtype).

        Allocates a weight-sized tensor: meant for inspection and tests; merging and the
        forward pass never call it.
        """
        theta = self.neuroada_theta[adapter_name]
        indices = self._checked_indices(adapter_name)
        with gathered([theta]):  # ZeRO-3 partitions theta too once the engine is built
            delta = torch.zeros(self.out_features, self.in_features, dtype=theta.dtype, device=theta.device)
            return delta.scatter_(1, indices.to(theta.device), theta.detach())

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write ``W[i, idx[i, j]] += theta[i, j]`` in place (O(out*k), no dense temporary).

        The merged entries are checked for NaN/inf before anything is written (always,
        ``safe_merge`` adds nothing), so a failing merge raises :class:`MergeError` and
        leaves the weight untouched.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        names = [name for name in adapter_names if name in self.neuroada_theta]
        if not names:
            return
        weight = self.get_base_layer().weight
        # ZeRO-3: gather this layer's weight (and theta) only; rank 0's edit is written back to
        # every rank's partition on exit (all ranks make the same edit).
        with gathered([weight, *(self.neuroada_theta[n] for n in names)], modifier_rank=0):
            for name in names:
                indices, original, updated = self._merge_plan(name, weight)
                put_entries_(weight.data, indices, updated)
                self._merge_backup[name] = original
                self.merged_adapters.append(name)

    def check_merge(self, adapter_names: list[str] | None = None) -> None:
        """Raise :class:`MergeError` if merging ``adapter_names`` would write NaN/inf; changes nothing."""
        names = [
            name
            for name in (adapter_names if adapter_names is not None else self.active_adapters)
            if name in self.neuroada_theta and name not in self.merged_adapters
        ]
        if not names:
            return
        # Read through the seam (gathers a ZeRO-3 weight read-only; a quantized layer dequantizes).
        with gathered([self.neuroada_theta[n] for n in names]), self._weight_for_reading() as weight:
            for name in names:
                self._merge_plan(name, weight)

    def _merge_plan(self, name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Indices, current values and merged values of the entries adapter ``name`` touches in ``weight``
        (the full base weight: the caller gathers it when it is partitioned)."""
        indices = self._checked_indices(name).to(weight.device)
        original = weight.data.gather(1, indices)
        updated = merge_values(
            original,
            self.neuroada_theta[name].detach().to(weight.device),
            what=f"NeuroAda adapter {name!r} into layer {self._layer_name()}",
            outcome="Nothing was merged.",
        )
        return indices, original, updated

    def unmerge(self) -> None:
        """Undo all merges, restoring the overwritten entries exactly (last merged first)."""
        if not self.merged:
            return
        weight = self.get_base_layer().weight
        thetas = [self.neuroada_theta[n] for n in self.merged_adapters if n in self.neuroada_theta]
        with gathered([weight, *thetas], modifier_rank=0):  # ZeRO-3: this layer only, written back
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                if name not in self.neuroada_theta:
                    continue
                indices = self._checked_indices(name).to(weight.device)
                original = self._merge_backup.pop(name, None)
                if original is None:  # e.g. merged state restored from elsewhere: best effort
                    theta = self.neuroada_theta[name].detach().to(weight.device)
                    original = (weight.data.gather(1, indices).to(theta.dtype) - theta).to(weight.dtype)
                put_entries_(weight.data, indices, original)

    def delete_adapter(self, adapter_name: str) -> None:
        self._merge_backup.pop(adapter_name, None)
        self._pending_selection.pop(adapter_name, None)
        cache = self.__dict__.get("_neuroada_indices_cache", {})
        for key in [key for key in cache if key[0] == adapter_name]:
            del cache[key]
        super().delete_adapter(adapter_name)


class Linear(nn.Module, NeuroAdaLayer):
    """NeuroAda around an ``nn.Linear``: ``y = base(x) + sum_j theta[:, j] * x[..., idx[:, j]]``.

    The base layer's own forward is called, so its hooks (and wrappers that act through
    them) keep working; the bypass never builds an ``[out, in]`` tensor.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: NeuroAdaConfig, module_name: str = "") -> None:
        super().__init__()
        NeuroAdaLayer.__init__(self, base_layer)
        self._neuroada_module_name = module_name
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name=module_name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.neuroada_theta:
                continue
            theta, indices = self.neuroada_theta[name], self._checked_indices(name)
            compact = self._compact_columns(name, indices) if theta.requires_grad and torch.is_grad_enabled() else None
            use_csr = indices.shape[1] >= CSR_MIN_K and csr_path_supported(x, theta)
            csr = self._csr_pattern(name, indices) if use_csr else None
            delta = sparse_bypass(x, theta, indices, compact, csr)
            result = result + delta.to(result.dtype)
        return result

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # Runs before the child ParameterDict/BufferDict load their entries: validate the
        # whole layer first, so a bad file fails with the layer's name and both shapes.
        self._validate_checkpoint_entries(state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _validate_checkpoint_entries(self, state_dict: dict[str, torch.Tensor], prefix: str) -> None:
        layer = prefix.removeprefix(_PEFT_MODEL_PREFIX).rstrip(".") or self._layer_name()
        base_shape = [self.out_features, self.in_features]
        index_prefix, theta_prefix = f"{prefix}neuroada_indices.", f"{prefix}neuroada_theta."
        where = f"layer {layer}"
        for key in [k for k in state_dict if k.startswith(index_prefix)]:
            indices = check_indices(state_dict[key], where=where, key=key)
            check_fits(
                tuple(indices.shape), index_span(indices), base_shape, where=where, weight="the base weight here"
            )
            state_dict[key] = indices
            self._pending_selection.pop(key[len(index_prefix) :], None)
        for key in [k for k in state_dict if k.startswith(theta_prefix)]:
            name = key[len(theta_prefix) :]
            k = full_shape(self.neuroada_theta[name])[1] if name in self.neuroada_theta else None
            check_theta(state_dict[key], where=where, key=key, expected=(self.out_features, k), base_shape=base_shape)
            if name in self.neuroada_theta and is_partitioned(self.neuroada_theta[name]):
                raise AdapterCheckpointError(
                    f"NeuroAda {where}: cannot load {key} into adapter {name!r}, whose theta DeepSpeed ZeRO-3 has "
                    "partitioned (the engine is built, and its optimizer keeps its own copy of theta). Load the adapter "
                    "before deepspeed.initialize / accelerator.prepare (as Trainer, TRL and Axolotl do), load it under "
                    "a new adapter name, or resume from the DeepSpeed checkpoint."
                )
        # After the shape checks: a file for another architecture is named as such, not as another base.
        weight = self.get_base_layer().weight
        check_loaded_fingerprints(
            self,
            state_dict,
            prefix,
            adapter_key="neuroada_theta",
            fingerprint_key="neuroada_fingerprint",
            read_weight=self._weight_for_reading if readable_here(weight) else None,
            where=f"NeuroAda {where}",
        )

    def __repr__(self) -> str:
        return "neuroada." + super().__repr__()

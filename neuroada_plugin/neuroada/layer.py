"""NeuroAda tuner layer: a frozen ``nn.Linear`` plus per-neuron sparse trainable bypasses."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from ..errors import AdapterCheckpointError
from ..kit.fingerprint import not_recorded, weight_fingerprint
from ..kit.layer import MethodLayer
from ..kit.sharded import agree_across_ranks, full_shape, gathered, is_partitioned
from .config import NeuroAdaConfig
from .csr_bypass import CSR_MIN_K, CsrPattern, csr_path_supported, csr_pattern
from .functional import compact_columns, sparse_bypass
from .selection import select_connections
from .validation import check_fits, check_indices, check_theta, index_span, merge_values, put_entries_


def theta_dtype(config: NeuroAdaConfig, weight: torch.Tensor) -> torch.dtype:
    """Dtype theta is created in: ``config.theta_dtype`` when set, else the base weight's (PEFT's rule).

    In the second case the tuner's ``_cast_adapter_dtype`` then upcasts bf16/fp16 to float32
    unless the user passed ``autocast_adapter_dtype=False``, exactly as for PEFT's own tuners.
    """
    if config.theta_dtype is not None:
        return config.torch_theta_dtype
    return weight.dtype if weight.dtype.is_floating_point else torch.float32


class NeuroAdaLayer(MethodLayer):
    """NeuroAda around a linear layer: ``y = base(x) + sum_j theta[:, j] * x[..., idx[:, j]]``.

    Per adapter it holds ``neuroada_theta[name]`` (trainable, ``[out, k]``) and
    ``neuroada_indices[name]`` (a persistent ``int64`` buffer ``[out, k]``: the input
    connection of every value). Indices are saved with the adapter, so a loaded adapter
    uses exactly the connections it was trained on. The bypass never builds an ``[out, in]``
    tensor; the base layer's own forward is called, so its hooks keep working.
    """

    method_name = "neuroada"
    adapter_layer_names = ("neuroada_theta",)
    other_param_names = ("neuroada_indices", "neuroada_fingerprint")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: NeuroAdaConfig, module_name: str = "") -> None:
        super().__init__(base_layer)
        self.neuroada_theta = nn.ParameterDict({})
        self.neuroada_indices = BufferDict({}, persistent=True)
        # Original values of the entries each merged adapter overwrote: unmerge restores
        # them bit for bit instead of subtracting theta (which rounds).
        self._merge_backup: dict[str, torch.Tensor] = {}
        # Adapters whose selection is deferred: PEFT is loading a saved adapter for inference,
        # whose file brings the indices; selection runs only if it does not (first use).
        self._pending_selection: dict[str, NeuroAdaConfig] = {}
        self._module_name = module_name
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name=module_name)

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
        self.fingerprints[adapter_name] = fingerprint
        self.set_adapter(self.active_adapters)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """Move the adapter to the base layer's device without changing any dtype.

        PEFT's default also casts to the base dtype; that would turn fp32 theta into bf16
        and (peft <= 0.20) the integer indices into floats.
        """
        target = device if device is not None else self.get_base_layer().weight.device
        if target.type == "meta":
            return
        for container in (self.neuroada_theta, self.neuroada_indices, self.fingerprints):
            if adapter_name in container and not container[adapter_name].is_meta:
                value = container[adapter_name]
                if isinstance(value, nn.Parameter):
                    container[adapter_name] = nn.Parameter(value.to(target), requires_grad=value.requires_grad)
                else:
                    container[adapter_name] = value.to(target)

    def _resolve_pending_selection(self) -> None:
        """Run the deferred selections that no loaded file supplied (from the unmerged weight)."""
        for name, config in list(self._pending_selection.items()):
            indices, fingerprint = self._select(config, self._module_name)
            self.neuroada_indices[name], self.fingerprints[name] = indices, fingerprint
            del self._pending_selection[name]

    def _select(self, config: NeuroAdaConfig, module_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices ``[out, k]`` selected from the full base weight, and that weight's fingerprint.

        With a ZeRO-3 partitioned weight the gather in :meth:`read_weight` is a collective
        that every rank enters, and rank 0's indices are then broadcast so that all ranks hold
        identical indices by construction (not only by deterministic selection).
        """
        with self.read_weight() as weight:
            indices = select_connections(weight, config.top_k, config.selection, seed=config.seed, salt=module_name)
            fingerprint = weight_fingerprint(weight).to(indices.device)
        base_weight = self.get_base_layer().weight
        if is_partitioned(base_weight):
            indices = agree_across_ranks(indices, like=base_weight, where=module_name or self.layer_name())
        return indices, fingerprint

    def _checked_indices(self, adapter_name: str) -> torch.Tensor:
        if self._pending_selection:
            self._resolve_pending_selection()
        indices = self.neuroada_indices[adapter_name]
        if indices.is_meta:
            raise AdapterCheckpointError(
                f"NeuroAda layer {self.layer_name()}: adapter {adapter_name!r} has no connection indices. The "
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

    def merge_into_weight(self, adapter_names: list[str]) -> None:
        """Write ``W[i, idx[i, j]] += theta[i, j]`` in place (O(out*k), no dense temporary).

        Merged entries are checked for NaN/inf before they are written; if a later adapter fails,
        the earlier ones of this call are undone, so a failing merge raises :class:`MergeError` and
        leaves the weight as it was.
        """
        weight = self.get_base_layer().weight
        # ZeRO-3: gather this layer's weight (and theta) only; rank 0's edit is written back to
        # every rank's partition on exit (all ranks make the same edit).
        with gathered([weight, *(self.neuroada_theta[n] for n in adapter_names)], modifier_rank=0):
            written = []  # adapters may share entries: each one's plan reads the weight as the previous left it
            try:
                for name in adapter_names:
                    indices, original, updated = self._merge_plan(name, weight)
                    put_entries_(weight.data, indices, updated)
                    written.append((indices, original))
                    self._merge_backup[name] = original
                    self.merged_adapters.append(name)
            except BaseException:
                for indices, original in reversed(written):  # a later adapter overflowed: leave the weight as it was
                    put_entries_(weight.data, indices, original)
                    self._merge_backup.pop(self.merged_adapters.pop(), None)
                raise

    def check_merge_values(self, adapter_names: list[str]) -> None:
        # Read through the kit (gathers a ZeRO-3 weight read-only; a quantized layer dequantizes).
        with gathered([self.neuroada_theta[n] for n in adapter_names]), self.read_weight() as weight:
            for name in adapter_names:
                self._merge_plan(name, weight)

    def _merge_plan(self, name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Indices, current values and merged values of the entries adapter ``name`` touches in ``weight``
        (the full base weight: the caller gathers it when it is partitioned)."""
        indices = self._checked_indices(name).to(weight.device)
        original = weight.data.gather(1, indices)
        updated = merge_values(
            original,
            self.neuroada_theta[name].detach().to(weight.device),
            what=f"NeuroAda adapter {name!r} into layer {self.layer_name()}",
            outcome="Nothing was merged.",
        )
        return indices, original, updated

    def unmerge_from_weight(self) -> None:
        """Undo all merges, restoring the overwritten entries exactly (last merged first)."""
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

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        theta, indices = self.neuroada_theta[adapter_name], self._checked_indices(adapter_name)
        compact = (
            self._compact_columns(adapter_name, indices) if theta.requires_grad and torch.is_grad_enabled() else None
        )
        use_csr = indices.shape[1] >= CSR_MIN_K and csr_path_supported(x, theta)
        csr = self._csr_pattern(adapter_name, indices) if use_csr else None
        return sparse_bypass(x, theta, indices, compact, csr)

    def check_loaded_state(self, state_dict: dict[str, torch.Tensor], prefix: str) -> None:
        """Check every index and theta entry of the file against this layer, naming the layer and both shapes."""
        layer = prefix.removeprefix("base_model.model.").rstrip(".") or self.layer_name()
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

    def __repr__(self) -> str:
        return "neuroada." + super().__repr__()


class Linear(NeuroAdaLayer):
    """NeuroAda around an ``nn.Linear`` (the bitsandbytes layers have their own subclasses in :mod:`.bnb`)."""

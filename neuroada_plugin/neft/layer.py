"""NeFT tuner layer: the selected neurons' updates as a bypass, ``y[..., rows] += x @ D.T`` or ``y += x[..., cols] @ D.T``."""

from __future__ import annotations

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from ..errors import AdapterCheckpointError, MergeError
from ..kit.fingerprint import not_recorded
from ..kit.layer import MethodLayer
from .config import NeftConfig
from .functional import add_neurons, delta_weight, neuron_output, write_neurons


class NeftLayer(MethodLayer):
    """Wraps one ``nn.Linear``. Per adapter: trainable ``neft_delta`` (``[n, in]`` for selected rows, ``[out, n]``
    for selected columns) and the int64 indices in ``neft_rows`` or ``neft_cols`` (one of the two per adapter)."""

    method_name = "neft"
    adapter_layer_names = ("neft_delta",)
    other_param_names = ("neft_rows", "neft_cols", "neft_fingerprint")

    def __init__(
        self,
        base_layer: nn.Linear,
        adapter_name: str,
        config: NeftConfig,
        axis: str,
        index: torch.Tensor | None,
        module_name: str = "",
    ) -> None:
        super().__init__(base_layer)
        self.neft_delta = nn.ParameterDict({})
        self.neft_rows = BufferDict({}, persistent=True)
        self.neft_cols = BufferDict({}, persistent=True)
        # Adapters created from a saved config whose file must bring the indices (loading).
        self._pending_neurons: set[str] = set()
        # (indices, axis, values before) of every merge, newest last: unmerge writes them back exactly.
        self._merge_backup: list[tuple[torch.Tensor, str, torch.Tensor]] = []
        self._module_name = module_name
        self._active_adapter = adapter_name
        self.add_neurons(adapter_name, config, axis, index, module_name)

    def add_neurons(
        self, adapter_name: str, config: NeftConfig, axis: str, index: torch.Tensor | int, module_name: str = ""
    ) -> None:
        """Add adapter ``adapter_name`` on the neurons ``index`` (a tensor), or on ``index`` placeholder neurons
        (an int: a saved adapter is being loaded, its file brings the indices)."""
        weight = self.get_base_layer().weight
        device = weight.device
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        if isinstance(index, int):
            index_tensor = torch.full((index,), -1, dtype=torch.int64, device=device)
            self._pending_neurons.add(adapter_name)
        else:
            index_tensor = index.to(device=device, dtype=torch.int64)
        count = index_tensor.numel()
        shape = (count, self.in_features) if axis == "rows" else (self.out_features, count)
        if config.init_weights:
            delta = torch.zeros(shape)
        else:  # small random values (tests): keyed on the layer, so two layers differ
            generator = torch.Generator().manual_seed(config.seed + sum(map(ord, module_name or self.layer_name())))
            delta = 0.02 * torch.randn(shape, generator=generator)
        self.neft_delta[adapter_name] = nn.Parameter(delta.to(device, dtype))
        (self.neft_rows if axis == "rows" else self.neft_cols)[adapter_name] = index_tensor
        if adapter_name in self._pending_neurons:
            self.fingerprints[adapter_name] = not_recorded().to(device)  # the file's replaces it
        else:
            self.record_fingerprint(adapter_name, config)
        self.set_adapter(self.active_adapters)

    def _neurons(self, adapter_name: str) -> tuple[torch.Tensor, str]:
        if adapter_name in self._pending_neurons:
            raise AdapterCheckpointError(
                f"NeFT layer {self.layer_name()}: adapter {adapter_name!r} was created from a saved config "
                "(neurons_per_module is set) but no neuron indices were loaded into it. Load the adapter with "
                "PeftModel.from_pretrained / load_adapter, or leave neurons_per_module unset to select anew."
            )
        if adapter_name in self.neft_rows:
            return self.neft_rows[adapter_name], "rows"
        return self.neft_cols[adapter_name], "cols"

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        index, axis = self._neurons(adapter_name)
        return neuron_output(x, self.neft_delta[adapter_name], index, axis, self.out_features)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense update of ``adapter_name`` (float32; for inspection)."""
        index, axis = self._neurons(adapter_name)
        return delta_weight((self.out_features, self.in_features), self.neft_delta[adapter_name], index, axis)

    # ---------------------------------------------------------------------------- merge

    def _what(self, name: str) -> str:
        return f"NeFT adapter {name!r} into layer {self.layer_name()}"

    def check_merge_values(self, adapter_names: list[str]) -> None:
        weight = self.get_base_layer().weight.data
        for name in adapter_names:
            index, axis = self._neurons(name)
            add_neurons(weight, self.neft_delta[name], index, axis, what=self._what(name))

    def merge_into_weight(self, adapter_names: list[str]) -> None:
        weight = self.get_base_layer().weight.data
        done: list[tuple[torch.Tensor, str, torch.Tensor]] = []
        try:
            for name in adapter_names:
                index, axis = self._neurons(name)
                new, old = add_neurons(weight, self.neft_delta[name], index, axis, what=self._what(name))
                write_neurons(weight, new, index, axis)
                done.append((index, axis, old))
        except MergeError:
            for index, axis, old in reversed(done):  # leave the weight as this call found it
                write_neurons(weight, old, index, axis)
            raise
        self._merge_backup.extend(done)
        self.merged_adapters.extend(adapter_names)

    def unmerge_from_weight(self) -> None:
        weight = self.get_base_layer().weight.data
        while self._merge_backup:
            index, axis, old = self._merge_backup.pop()
            write_neurons(weight, old, index, axis)
        self.merged_adapters.clear()

    # ---------------------------------------------------------------------------- loading

    def check_loaded_state(self, state_dict: dict[str, torch.Tensor], prefix: str) -> None:
        """Indices must be distinct neurons of this layer and match the delta's shape; settles pending adapters."""
        layer = prefix.removeprefix("base_model.model.").rstrip(".") or self.layer_name()
        for axis, size in (("rows", self.out_features), ("cols", self.in_features)):
            for key in [k for k in state_dict if k.startswith(f"{prefix}neft_{axis}.")]:
                name = key[len(f"{prefix}neft_{axis}.") :]
                index = state_dict[key]
                bad = index.dtype.is_floating_point or index.dim() != 1
                if not bad and index.numel() and not index.is_meta:
                    bad = int(index.min()) < 0 or int(index.max()) >= size or index.unique().numel() != index.numel()
                if bad:
                    raise AdapterCheckpointError(
                        f"NeFT layer {layer}: {key} must hold distinct {axis[:-1]} indices in 0..{size - 1} (weight "
                        f"{[self.out_features, self.in_features]}); the adapter was made for another model, or the "
                        "file is damaged."
                    )
                delta = state_dict.get(f"{prefix}neft_delta.{name}")
                expected = (index.numel(), self.in_features) if axis == "rows" else (self.out_features, index.numel())
                if delta is not None and tuple(delta.shape) != expected:
                    raise AdapterCheckpointError(
                        f"NeFT layer {layer}: neft_delta.{name} is {tuple(delta.shape)}, expected {expected} for "
                        f"{index.numel()} selected {axis}."
                    )
                state_dict[key] = index.to(torch.int64)
                self._pending_neurons.discard(name)

    def __repr__(self) -> str:
        return "neft." + super().__repr__()


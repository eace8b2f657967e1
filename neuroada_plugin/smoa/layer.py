"""SMoA tuner layer: ``y = base(x) + (alpha / r) * dW dropout(x)``, ``dW`` built block by block, never kept."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from ..errors import AdapterCheckpointError
from ..kit.fingerprint import not_recorded, weight_fingerprint
from ..kit.fused import exact_fused_dtype, plain_linear
from ..kit.layer import WeightFunctionLayer
from .config import SmoaConfig
from .functional import BlockLayout, BlockModulatedDelta, ModulatedLinear, check_order, merged_weight, spectral_orders
from .functional import delta_weight as dense_delta


class SmoaLayer(WeightFunctionLayer):
    """Wraps one ``nn.Linear``. Per adapter name: trainable ``smoa_A`` / ``smoa_B`` (every block's ``A_k`` /
    ``B_k``, flattened and concatenated; see :class:`~.functional.BlockLayout`) and the saved orderings
    ``smoa_rows`` (``[out]``) and ``smoa_cols`` (``[in]``), int64 permutations."""

    method_name = "smoa"
    adapter_layer_names = ("smoa_A", "smoa_B")
    other_param_names = ("smoa_rows", "smoa_cols", "smoa_layout", "smoa_scaling", "smoa_dropout", "smoa_fingerprint")

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config: SmoaConfig, module_name: str = "") -> None:
        super().__init__(base_layer)
        self.smoa_A = nn.ParameterDict({})
        self.smoa_B = nn.ParameterDict({})
        self.smoa_rows = BufferDict({}, persistent=True)
        self.smoa_cols = BufferDict({}, persistent=True)
        self.smoa_layout: dict[str, BlockLayout] = {}
        self.smoa_scaling: dict[str, float] = {}
        self.smoa_dropout: dict[str, float] = {}
        # Adapters whose orderings a file being loaded will bring (PEFT inference loading); computed
        # from the weight on first use only if it did not.
        self._pending_orders: set[str] = set()
        self._module_name = module_name
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name=module_name)

    def update_layer(self, adapter_name: str, config: SmoaConfig, module_name: str = "") -> None:
        weight = self.get_base_layer().weight
        dtype = self.adapter_init_dtype()
        layout = BlockLayout.of(self.out_features, self.in_features, config.ranks)

        def kaiming(n_rows: int, n_cols: int) -> torch.Tensor:
            block = torch.empty(n_rows, n_cols)
            if block.numel():  # a block of rank 0 has no factors
                nn.init.kaiming_uniform_(block, a=math.sqrt(5))  # nn.Linear's default, as the authors' A_k
            return block.reshape(-1)

        ranks, rows, cols = layout.ranks, layout.row_sizes, layout.col_sizes
        a = torch.cat([kaiming(r, c) for r, c in zip(ranks, cols, strict=True)])
        if config.init_weights:
            b = torch.zeros(layout.b_numel)
        else:
            b = torch.cat([kaiming(n, r) for n, r in zip(rows, ranks, strict=True)])
        self.smoa_A[adapter_name] = nn.Parameter(a.to(weight.device, dtype))
        self.smoa_B[adapter_name] = nn.Parameter(b.to(weight.device, dtype))
        self.smoa_layout[adapter_name] = layout
        self.smoa_scaling[adapter_name] = config.scaling
        self.smoa_dropout[adapter_name] = config.dropout

        if weight.is_meta or self.smoa_A[adapter_name].is_meta or config.inference_mode:
            # PEFT is loading a saved adapter: its file brings the orderings (and the fingerprint).
            # -1 makes a file that somehow captured this placeholder fail validation loudly.
            device = "meta" if weight.is_meta else weight.device
            self.smoa_rows[adapter_name] = torch.full((self.out_features,), -1, dtype=torch.int64, device=device)
            self.smoa_cols[adapter_name] = torch.full((self.in_features,), -1, dtype=torch.int64, device=device)
            self.fingerprints[adapter_name] = not_recorded().to(device)
            self._pending_orders.add(adapter_name)
        else:
            self._compute_orders(adapter_name)
            self.record_fingerprint(adapter_name, config)
        self.set_adapter(self.active_adapters)

    def _compute_orders(self, adapter_name: str) -> None:
        """The spectral orderings of the (pre-merge) weight: one SVD, at creation only."""
        with self.read_pre_merge_weight() as weight:
            rows, cols = spectral_orders(weight)
        self.smoa_rows[adapter_name], self.smoa_cols[adapter_name] = rows, cols
        self._pending_orders.discard(adapter_name)

    def _orders(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if adapter_name in self._pending_orders:  # created for inference, and no file brought the orderings
            self._compute_orders(adapter_name)
            with self.read_weight() as weight:
                self.fingerprints[adapter_name] = weight_fingerprint(weight).to(weight.device)
        return self.smoa_rows[adapter_name], self.smoa_cols[adapter_name]

    # ---------------------------------------------------------------------------- forward

    def check_weight_for_forward(self) -> None:
        weight = self.get_base_layer().weight
        if weight.shape != (self.out_features, self.in_features):
            raise RuntimeError(
                f"SMoA layer {self.layer_name()} ({self.out_features}x{self.in_features}) sees its frozen weight as a "
                f"{tuple(weight.shape)} shard in the forward pass (DeepSpeed ZeRO-3 gathers it only inside the base "
                "layer's own forward); SMoA reads the whole weight every step. Use ZeRO-1/2, DDP or FSDP."
            )

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        rows, cols = self._orders(adapter_name)
        p = self.smoa_dropout[adapter_name]
        x = F.dropout(x, p=p, training=self.training) if p > 0 else x
        a, b = self.smoa_A[adapter_name], self.smoa_B[adapter_name]
        delta = BlockModulatedDelta.apply(x, a, b, rows, cols, self.smoa_layout[adapter_name], self.read_weight)
        return delta * self.smoa_scaling[adapter_name]

    def fused_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor | None:
        """``base(x) + adapter(x)`` as one matmul per row chunk of ``W0 + dW`` (see ``kit/fused.py``): in float32
        and float64 on a plain frozen ``nn.Linear``, without dropout; ``None`` (the separate path) otherwise."""
        base = self.get_base_layer()
        a, b = self.smoa_A[adapter_name], self.smoa_B[adapter_name]
        if self.training and self.smoa_dropout[adapter_name] > 0:
            return None  # the update reads dropout(x), the base x
        if not plain_linear(base) or b.dtype != a.dtype or not exact_fused_dtype(base.weight, x, a.dtype):
            return None
        rows, cols = self._orders(adapter_name)
        layout, scaling = self.smoa_layout[adapter_name], self.smoa_scaling[adapter_name]
        result = ModulatedLinear.apply(x, a, b, rows, cols, layout, scaling, self.read_weight)
        return result if base.bias is None else result + base.bias

    # ---------------------------------------------------------------------------- merge

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense update of ``adapter_name`` from the pre-merge weight (float32, float64 for a float64 weight)."""
        rows, cols = self._orders(adapter_name)
        a, b = self.smoa_A[adapter_name], self.smoa_B[adapter_name]
        return dense_delta(self.pre_merge_weight(), a, b, rows, cols, self.smoa_layout[adapter_name], self.smoa_scaling[adapter_name])

    def merged_weight(self, current: torch.Tensor, original: torch.Tensor, adapter_name: str) -> torch.Tensor:
        rows, cols = self._orders(adapter_name)
        a, b = self.smoa_A[adapter_name], self.smoa_B[adapter_name]
        what = f"SMoA adapter {adapter_name!r} into layer {self.layer_name()}"
        layout, scaling = self.smoa_layout[adapter_name], self.smoa_scaling[adapter_name]
        return merged_weight(current, original, a, b, rows, cols, layout, scaling, what=what)

    # ---------------------------------------------------------------------------- loading

    def check_loaded_state(self, state_dict: dict[str, torch.Tensor], prefix: str) -> None:
        """Orderings must be permutations of this layer's rows/columns, factors the sizes the config gives."""
        layer = prefix.removeprefix("base_model.model.").rstrip(".") or self.layer_name()
        sizes = {"smoa_rows": self.out_features, "smoa_cols": self.in_features}
        for kind, size in sizes.items():
            for key in [k for k in state_dict if k.startswith(f"{prefix}{kind}.")]:
                problem = check_order(state_dict[key], size)
                if problem is not None:
                    raise AdapterCheckpointError(
                        f"SMoA layer {layer}: {key} has {problem}; this layer's weight is "
                        f"{[self.out_features, self.in_features]}. The adapter was made for another model, or the file "
                        "is damaged."
                    )
                state_dict[key] = state_dict[key].to(torch.int64)
        for name in list(self._pending_orders):
            found = [f"{prefix}{kind}.{name}" in state_dict for kind in sizes]
            if all(found):
                self._pending_orders.discard(name)
            elif any(found) or f"{prefix}smoa_A.{name}" in state_dict:
                # Factors without their orderings: recomputing them could misplace every block.
                raise AdapterCheckpointError(
                    f"SMoA layer {layer}: the file holds adapter {name!r}'s factors but not both of its orderings "
                    "(smoa_rows, smoa_cols), which are never recomputed on load. Re-save the adapter with "
                    "save_pretrained."
                )
        for kind, numel in (("smoa_A", "a_numel"), ("smoa_B", "b_numel")):
            for key in [k for k in state_dict if k.startswith(f"{prefix}{kind}.")]:
                name = key[len(f"{prefix}{kind}.") :]
                if name not in self.smoa_layout:
                    continue
                expected = getattr(self.smoa_layout[name], numel)
                tensor = state_dict[key]
                if tensor.dim() != 1 or tensor.numel() != expected or not tensor.is_floating_point():
                    layout = self.smoa_layout[name]
                    raise AdapterCheckpointError(
                        f"SMoA layer {layer}: {key} is a {tuple(tensor.shape)} {tensor.dtype} tensor, but ranks "
                        f"{list(layout.ranks)} on blocks of {list(layout.row_sizes)} rows x {list(layout.col_sizes)} "
                        f"columns need a flat float tensor of {expected} entries. The adapter was made with another "
                        "r / num_blocks / branch_ranks or for another model."
                    )

    def __repr__(self) -> str:
        return "smoa." + super().__repr__()

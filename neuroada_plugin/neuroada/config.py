"""Configuration of the NeuroAda PEFT method."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..config_base import MethodConfig

SELECTIONS = ("magnitude", "smallest", "random")
THETA_DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclass
class NeuroAdaConfig(MethodConfig):
    """Configuration for NeuroAda (Zhang et al., 2025): per-neuron top-k sparse bypass.

    For every output neuron (row) of each targeted ``nn.Linear`` the ``top_k`` input
    connections with the largest ``|W|`` are selected once, from the frozen weight, and a
    zero-initialised trainable value is learned for each of them. Only ``sum(out * top_k)``
    values train; the result merges exactly into the weight (``W[i, idx] += theta``).

    Args:
        top_k: Connections trained per output neuron. ``1`` is the paper's ~0.02% setting
            (default); ``20`` is its higher-capacity ~0.4% setting.
        target_modules: Module names (list: exact or suffix match; str: regex) to adapt.
            ``None`` picks the attention and MLP projections of every layer for known
            architectures; ``"all-linear"`` adapts every linear layer except the output head.
        exclude_modules: Names (list) or regex (str) of modules never to adapt.
        layers_to_transform: Only adapt these layer indices (with ``layers_pattern``).
        layers_pattern: Name of the ``nn.ModuleList`` holding the layers, e.g. ``"layers"``.
        selection: ``"magnitude"`` (paper): largest ``|W|`` per row; ``"smallest"``: the
            smallest ``|W|`` per row (ablation); ``"random"``: uniform per row, seeded by
            ``seed`` and the module name (ablation).
        seed: Seed of the ``"random"`` selection; ignored otherwise.
        theta_dtype: Dtype of the trainable values. ``None`` (default) follows PEFT's
            ``autocast_adapter_dtype`` like every PEFT tuner: theta is created in the base
            weight's dtype and upcast to float32 when the flag is ``True`` (its default), so
            by default theta is float32 also on a bf16 base (sparse updates smaller than a
            bf16 ulp of the weight would otherwise vanish); with the flag ``False`` it stays
            in the base dtype. Set a dtype name to pin theta to it whatever the flag says.
        init_weights: ``True`` initialises theta to zero (the adapted model starts identical
            to the base). ``False`` draws small random values (for tests and debugging).
        modules_to_save: Extra modules trained in full and saved with the adapter.
        trainable_token_indices: Token ids whose embedding rows train (written by TRL when it
            adds tokens); a list, or a dict of embedding module name -> list.
    """

    method_name = "neuroada"

    top_k: int = field(
        default=1,
        metadata={"help": "Input connections trained per output neuron (1: ~0.02% params; 20: ~0.4%).", "ge": 1},
    )
    selection: Literal["magnitude", "smallest", "random"] = field(
        default="magnitude",
        metadata={"help": "'magnitude' (paper): top-|W| per row; 'smallest' and seeded 'random' are ablations."},
    )
    seed: int = field(default=0, metadata={"help": "Seed for selection='random'."})
    theta_dtype: Literal["float32", "bfloat16", "float16", "float64"] | None = field(
        default=None,
        metadata={
            "help": "Dtype of the trainable values. None (default): as PEFT's autocast_adapter_dtype says (float32 "
            "unless it is False, then the base dtype); float32, bfloat16, float16 or float64 pin it."
        },
    )
    init_weights: bool = field(
        default=True, metadata={"help": "Zero-initialise theta (True, paper) or draw small random values (False)."}
    )
    trainable_token_indices: list[int] | dict[str, list[int]] | None = field(
        default=None, metadata={"help": "Token ids whose embedding rows are trainable (set by TRL on added tokens)."}
    )

    def _validate(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(
                f"NeuroAdaConfig.top_k must be an integer >= 1 (connections per output neuron), got {self.top_k!r}."
            )
        if self.selection not in SELECTIONS:
            raise ValueError(
                f"NeuroAdaConfig.selection must be one of {SELECTIONS}, got {self.selection!r}. "
                "'magnitude' is the paper's method."
            )
        if self.theta_dtype is not None and self.theta_dtype not in THETA_DTYPES:
            raise ValueError(
                f"NeuroAdaConfig.theta_dtype must be one of {THETA_DTYPES}, or None to follow PEFT's "
                f"autocast_adapter_dtype, got {self.theta_dtype!r}."
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"NeuroAdaConfig.seed must be an integer, got {self.seed!r}.")
        if self.trainable_token_indices is not None and not isinstance(self.trainable_token_indices, (list, dict)):
            raise ValueError(
                "NeuroAdaConfig.trainable_token_indices must be a list of token ids or a dict "
                f"{{embedding_module_name: [token ids]}}, got {type(self.trainable_token_indices).__name__}."
            )

    @property
    def torch_theta_dtype(self):
        """``theta_dtype`` as a ``torch.dtype``, or ``None`` when PEFT's autocast flag decides."""
        import torch

        return getattr(torch, self.theta_dtype) if self.theta_dtype is not None else None

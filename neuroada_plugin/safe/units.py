"""Adapters as freezable units: which modules hold trainable adapter parameters, grouped by block.

A unit is what SAFE scores and freezes as one: every adapted module of a transformer block
(``granularity="block"``, the adapters of one layer as in adapter tuning) or each adapted module
alone. Any PEFT tuner layer counts (this package's methods and PEFT's LoRA alike), so the
callback needs no knowledge of the method. Parameters outside tuner layers (``modules_to_save``)
are never frozen.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["AdapterUnit", "find_units", "release_optimizer_state"]

_BLOCK_INDEX = re.compile(r"\.(\d+)\.")


@dataclass
class AdapterUnit:
    """One freezable unit: its name, depth order, adapted modules and their trainable parameters."""

    name: str
    order: int  # position of its first module in ``named_modules()``: input side first
    modules: dict[str, nn.Module] = field(default_factory=dict)
    parameters: dict[str, nn.Parameter] = field(default_factory=dict)
    frozen: bool = False

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters.values())

    def freeze(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Stop training this unit: no gradient, no optimizer state; the values stay as they are."""
        for param in self.parameters.values():
            param.requires_grad_(False)
            param.grad = None
        release_optimizer_state(optimizer, self.parameters.values())
        self.frozen = True

    def keep_frozen(self) -> None:
        """Re-assert ``requires_grad=False`` (PEFT's ``set_adapter`` turns the active adapter's grads back on)."""
        for param in self.parameters.values():
            if param.requires_grad:
                param.requires_grad_(False)


def _tuner_layer_type() -> type:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return BaseTunerLayer


def _adapter_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The module's trainable parameters outside its frozen ``base_layer``."""
    return {
        name: param
        for name, param in module.named_parameters()
        if param.requires_grad and not name.startswith("base_layer.") and ".base_layer." not in name
    }


def _unit_name(module_name: str, granularity: str) -> str:
    """``model.layers.3`` for a module inside block 3 (block granularity); else the module's own name."""
    match = _BLOCK_INDEX.search(module_name + ".")
    if granularity == "block" and match:
        return module_name[: match.end(1)]
    return module_name


def find_units(model: nn.Module, granularity: str = "block") -> list[AdapterUnit]:
    """The model's trainable adapters as units, ordered from the input side (module registration order).

    Raises ``ValueError`` when no tuner layer has a trainable parameter: SAFE has nothing to freeze.
    """
    tuner_layer = _tuner_layer_type()
    units: dict[str, AdapterUnit] = {}
    for position, (name, module) in enumerate(model.named_modules()):
        if not isinstance(module, tuner_layer):
            continue
        params = _adapter_parameters(module)
        if not params:
            continue
        unit_name = _unit_name(name, granularity)
        unit = units.setdefault(unit_name, AdapterUnit(name=unit_name, order=position))
        unit.modules[name] = module
        unit.parameters.update({f"{name}.{pname}": p for pname, p in params.items()})
    if not units:
        raise ValueError(
            "SAFE found no trainable adapter layer in the model: pass a PEFT model (LoRA or a method of this "
            "package) whose adapter is being trained."
        )
    return sorted(units.values(), key=lambda unit: unit.order)


def release_optimizer_state(optimizer: torch.optim.Optimizer | None, params: Iterable[nn.Parameter]) -> None:
    """Drop the optimizer state (e.g. Adam moments) of ``params``; they stay in their param groups.

    Keeping them in the groups keeps the optimizer's layout, so a checkpoint saved after freezing
    loads into a fresh optimizer; AdamW and SGD skip a parameter whose ``grad`` is ``None``.
    """
    inner = optimizer
    while getattr(inner, "optimizer", None) is not None and inner.optimizer is not inner:
        inner = inner.optimizer  # accelerate's AcceleratedOptimizer wraps the torch optimizer
    if inner is None:
        return
    for param in params:
        inner.state.pop(param, None)

"""The fixed probe batch and the importance of each adapter unit on it (forward hooks only).

The probe batch is the first rows of the first training batch the model sees (input ids,
attention mask, position ids; labels are not needed), so it needs no extra data argument and
works with every trainer's collation. Scoring runs one forward in eval mode without gradients,
with a forward hook on every adapted module of the units still training; the model is not
changed and training's random state is not touched (dropout is off in eval mode).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .cka import centered_gram, cka_from_grams
from .units import AdapterUnit

__all__ = ["ProbeBatch", "score_units"]

_PROBE_KEYS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")


class ProbeBatch:
    """Captures the probe batch from the first training forward of ``model`` and replays it."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.tensors: dict[str, torch.Tensor] = {}
        self._handle: Any = None

    @property
    def ready(self) -> bool:
        return bool(self.tensors)

    def capture_from(self, model: nn.Module) -> None:
        """Keep the first ``rows`` rows of the next grad-enabled training forward's inputs."""
        if self.ready or self._handle is not None:
            return

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not (module.training and torch.is_grad_enabled()):
                return  # a reference-model or generation forward, not a training batch
            found = {key: kwargs[key] for key in _PROBE_KEYS if isinstance(kwargs.get(key), torch.Tensor)}
            if "input_ids" not in found and args and isinstance(args[0], torch.Tensor):
                found["input_ids"] = args[0]
            if "input_ids" not in found:
                return
            self.tensors = {key: value[: self.rows].detach().clone() for key, value in found.items()}
            self.remove_hook()

        self._handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def remove_hook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def token_mask(self) -> torch.Tensor | None:
        mask = self.tensors.get("attention_mask")
        return None if mask is None or mask.dim() != 2 else mask.bool()

    def to_json(self) -> dict[str, Any]:
        """Plain lists (the probe is part of the callback's checkpoint state, written as JSON)."""
        return {
            key: {"dtype": str(value.dtype).removeprefix("torch."), "values": value.cpu().tolist()}
            for key, value in self.tensors.items()
        }

    def load_json(self, data: Mapping[str, Any]) -> None:
        self.tensors = {
            key: torch.tensor(item["values"], dtype=getattr(torch, item["dtype"])) for key, item in data.items()
        }


def _even_rows(features: torch.Tensor, limit: int) -> torch.Tensor:
    if features.shape[0] <= limit:
        return features
    index = torch.linspace(0, features.shape[0] - 1, limit, device=features.device).round().long()
    return features.index_select(0, index)


def _features(output: torch.Tensor, mask: torch.Tensor | None, limit: int) -> torch.Tensor:
    """Token features ``[n, d]`` of a module output: non-padding positions, at most ``limit`` evenly spaced."""
    if mask is not None and tuple(output.shape[:-1]) == tuple(mask.shape):
        flat = output[mask.to(output.device)]
    else:
        flat = output.reshape(-1, output.shape[-1])
    return _even_rows(flat, limit)


@torch.no_grad()
def score_units(
    model: nn.Module,
    units: list[AdapterUnit],
    probe: ProbeBatch,
    importance: str,
    token_limit: int,
    previous_grams: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, float | None], dict[str, torch.Tensor]]:
    """Importance of every unit still training, and the adapted outputs' centred Gram matrices.

    ``importance="disabled"``: per module, ``1 - CKA(base layer output, adapted output)``.
    ``importance="drift"``: ``1 - CKA(adapted output at the previous check, now)``; ``None`` for a
    unit without a previous check. A unit's score is the mean over its modules.
    """
    mask = probe.token_mask()
    module_scores: dict[str, float | None] = {}
    grams: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            adapted = output[0] if isinstance(output, tuple) else output
            gram = centered_gram(_features(adapted, mask, token_limit))
            grams[name] = gram.cpu()
            if importance == "disabled":
                base = module.get_base_layer()(*args, **kwargs)
                base = base[0] if isinstance(base, tuple) else base
                module_scores[name] = 1.0 - cka_from_grams(centered_gram(_features(base, mask, token_limit)), gram)
            else:
                before = None if previous_grams is None else previous_grams.get(name)
                module_scores[name] = None if before is None else 1.0 - cka_from_grams(before.to(gram), gram)

        return hook

    handles = [
        module.register_forward_hook(hook_for(name), with_kwargs=True)
        for unit in units
        if not unit.frozen
        for name, module in unit.modules.items()
    ]
    device = next(p.device for p in model.parameters())
    was_training = model.training
    try:
        model.eval()
        model(**{key: value.to(device) for key, value in probe.tensors.items()})
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()

    scores: dict[str, float | None] = {}
    for unit in units:
        if unit.frozen:
            continue
        values = [module_scores.get(name) for name in unit.modules]
        scores[unit.name] = None if any(v is None for v in values) else sum(values) / len(values)
    return scores, grams

"""The toy's streaming-merge rule: ``W <- merged_weight(W, a, b, scale)`` for each adapted module."""

from __future__ import annotations

from collections.abc import Mapping

from neuroada_plugin.merge.rules import AdapterModule, BaseTensorInfo, TensorPatch

from .functional import merged_weight


def toyrank_checkpoint_rule(module: AdapterModule, base_tensors: Mapping[str, BaseTensorInfo]) -> list[TensorPatch]:
    a, b = module.tensors["a"], module.tensors["b"]
    scale = float(module.config.get("scale", 1.0))
    return [
        TensorPatch(
            target=f"{module.module}.weight",
            apply=lambda weight: merged_weight(weight, a, b, scale, what=f"toyrank adapter into {module.module}"),
            description="toyrank",
        )
    ]

"""A toy method for the merge engine's tests: its own module plus one registration, no shared code touched.

``toyscale`` stores one float tensor per adapted module, ``<module>.toyscale_delta`` (the weight's
shape), and merging writes ``W + scale * delta`` (``scale`` from ``adapter_config.json``), computed
in float64 and rounded once to the weight's dtype. It has a streaming-merge rule only: its
``config``/``tuner`` paths name nothing (the merge never loads them), so it is registered only
for the tests that need it (:func:`registered`) and never with PEFT.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from neuroada_plugin.errors import AdapterCheckpointError
from neuroada_plugin.merge.rules import AdapterModule, BaseTensorInfo, TensorPatch
from neuroada_plugin.registry import MethodSpec, register, unregister

SPEC = MethodSpec(
    name="toyscale",
    config="toy_merge_method:ToyScaleConfig",  # not defined: a merge-only toy
    tuner="toy_merge_method:ToyScaleModel",
    checkpoint_rule="toy_merge_method:toyscale_rule",
    summary="Toy: W + scale * delta (merge-engine tests only).",
    needs_float_weights=True,
    reads_weights_when_created=False,
    exact_merge=False,
)


def toyscale_rule(module: AdapterModule, base_tensors: Mapping[str, BaseTensorInfo]) -> list[TensorPatch]:
    if set(module.tensors) != {"delta"}:
        raise AdapterCheckpointError(f"{module.where}: toyscale stores only 'delta', found {sorted(module.keys)}.")
    delta = module.tensors["delta"]
    scale = float(module.config.get("scale", 1.0))

    def check(info: BaseTensorInfo) -> None:
        if info.shape != tuple(delta.shape):
            raise AdapterCheckpointError(
                f"toyscale {module.where}: delta has shape {list(delta.shape)}, base tensor {info.name!r} "
                f"{list(info.shape)}."
            )

    def apply(weight: torch.Tensor) -> torch.Tensor:
        return (weight.double() + scale * delta.double()).to(weight.dtype)

    return [TensorPatch(target=f"{module.module}.weight", apply=apply, check=check, description="toyscale")]


@contextmanager
def registered() -> Iterator[MethodSpec]:
    """The toy method registered for the duration of the block."""
    register(SPEC)
    try:
        yield SPEC
    finally:
        unregister(SPEC.name)

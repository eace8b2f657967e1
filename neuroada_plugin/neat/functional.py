"""NEAT's math, shared by the tuner layer and the streaming-merge rule (torch only, no PEFT).

Notation (PyTorch layout): ``W0`` is the frozen weight ``[out, in]``; trainable ``A: [r, out]``,
``B: [out, r]`` and, for ``depth = L > 0``, stacked residual pairs ``E, D: [L, r, r]``.

``P = act(A @ W0)`` (``[r, in]``); when ``L > 0``: keep ``R_l = P`` and set ``P <- act(E_l @ P)`` for
``l = 1..L``, then ``P <- act(D_l @ P) + R_{L+1-l}`` for ``l = 1..L``. The update is
``dW = s * B @ P`` (rank <= r). This is PEFT's PEANuT (``peft.tuners.peanut``) written on the
transposed side, so the layer never builds an ``[out, in]`` tensor: ``dW x = s * B (P x)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..kit.merge_checks import checked_finite
from ..kit.weight_product import WeightReader, frozen_weight_product

__all__ = ["ACTIVATIONS", "activation", "delta_weight", "merged_weight", "neat_delta", "weight_features"]


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.square(F.relu(x))


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


# Names as in ``transformers.activations.ACT2FN`` (what PEANuT's ``act_fn`` accepts), for the
# activations that have a plain torch equivalent.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "leaky_relu": F.leaky_relu,
    "relu6": F.relu6,
    "relu2": _relu2,
    "mish": F.mish,
    "hardswish": F.hardswish,
    "linear": _identity,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"Unsupported NEAT activation {name!r}; supported: {sorted(ACTIVATIONS)}.") from None


def weight_features(
    weight: torch.Tensor | WeightReader,
    a: torch.Tensor,
    encoders: torch.Tensor | None,
    decoders: torch.Tensor | None,
    act: str,
) -> torch.Tensor:
    """``P`` (``[r, in]``, in ``a``'s dtype): the weight-aware network applied to every input column of ``W0``.

    ``weight``: ``W0`` itself, or a reader of it (the layer's ``read_weight``: gathered under ZeRO-3,
    dequantized on a quantized base), read in forward and again in backward, never kept in between.
    """
    fn = activation(act)
    features = fn(frozen_weight_product(a, weight))
    depth = 0 if encoders is None else encoders.shape[0]
    residuals = []
    for layer in range(depth):
        residuals.append(features)
        features = fn(encoders[layer].to(a.dtype) @ features)
    for layer in range(depth):
        features = fn(decoders[layer].to(a.dtype) @ features) + residuals[depth - 1 - layer]
    return features


def neat_delta(x: torch.Tensor, features: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``s * B (P x)`` for a batch of inputs ``x`` (``[..., in]``), in ``features``' dtype."""
    hidden = x.to(features.dtype) @ features.T
    return (hidden @ b.to(features.dtype).T) * scaling


def delta_weight(
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    encoders: torch.Tensor | None,
    decoders: torch.Tensor | None,
    act: str,
    scaling: float,
) -> torch.Tensor:
    """The dense ``dW = s * B @ P`` (``[out, in]``, float32) of the original weight ``weight``; for merging only."""
    f32 = torch.float32
    features = weight_features(
        weight.to(f32),
        a.detach().to(f32),
        None if encoders is None else encoders.detach().to(f32),
        None if decoders is None else decoders.detach().to(f32),
        act,
    )
    return (b.detach().to(f32) @ features) * scaling


def merged_weight(
    current: torch.Tensor,
    original: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    encoders: torch.Tensor | None,
    decoders: torch.Tensor | None,
    act: str,
    scaling: float,
    what: str = "a NEAT adapter",
) -> torch.Tensor:
    """``current + dW(original)`` computed in float32, returned in ``current``'s dtype (:class:`MergeError` for NaN/inf).

    ``original`` is the weight before any adapter was merged: NEAT's update is a function of it,
    so a second adapter merged on top still reads the pre-merge weight.
    """
    delta = delta_weight(original, a, b, encoders, decoders, act, scaling)
    merged = (current.to(torch.float32) + delta).to(current.dtype)
    return checked_finite(merged, what=what)

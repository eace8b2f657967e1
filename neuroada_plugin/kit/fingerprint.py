"""Which base model an adapter belongs to: a 16-number fingerprint of every adapted weight, saved with the adapter.

An adapter of this package only fits the weights it was created on (NeuroAda's connections are the
top-|W| entries of *that* W; NEAT's update is a function of it), yet nothing stops a user from merging
or loading it onto another checkpoint of the same shapes. So each adapted layer records
``R @ (W @ s)`` (``s`` a seeded random sign vector over the inputs, ``R`` 16 seeded random sign rows
over the outputs) from the weight as the method read it when the adapter was created (dequantized
for a 4-bit/8-bit base, gathered under ZeRO-3). Merge, verify and PEFT loading compute it again
from the weight they see and compare.

Why this tolerance: the fingerprint mixes every entry with random signs, so rounding and quantization
noise averages out while a different weight gives an unrelated vector. Measured on SmolLM2-135M's
projections (relative distance ``|a - b| / |a|``): bf16/fp16 casts <= 0.003, int8 <= 0.01, NF4 <= 0.12,
FP4 <= 0.16 (an adapter trained on a 4-bit base merged into its full-precision original is expected
and accepted); another layer or a random weight of the same shape ~1.4. A distance above
:data:`TOLERANCE` (0.5) is refused unless the user overrides it (``--allow-base-mismatch``, or
``NEUROADA_ALLOW_BASE_MISMATCH=1`` for PEFT loading). An all-zero fingerprint means "not recorded"
(an adapter saved before fingerprints existed): nothing is compared.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from ..errors import AdapterCheckpointError

__all__ = [
    "FINGERPRINT_SIZE",
    "OVERRIDE_ENV",
    "TOLERANCE",
    "BaseMismatchError",
    "check_fingerprint",
    "check_loaded_fingerprints",
    "raise_pending_mismatches",
    "fingerprint_distance",
    "is_recorded",
    "mismatch_allowed",
    "not_recorded",
    "readable_here",
    "weight_fingerprint",
]

FINGERPRINT_SIZE = 16
TOLERANCE = 0.5
OVERRIDE_ENV = "NEUROADA_ALLOW_BASE_MISMATCH"
_SEED = 20251205


class BaseMismatchError(AdapterCheckpointError):
    """The adapter was created on other base weights than the ones it is being merged into or loaded onto."""


def _signs(length: int, rows: int, generator: torch.Generator) -> torch.Tensor:
    return (torch.randint(0, 2, (rows, length), generator=generator) * 2 - 1).to(torch.float32)


@torch.no_grad()
def weight_fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """The float32 ``[16]`` fingerprint of an ``[out, in]`` floating-point weight (on the CPU).

    One matrix-vector product over the weight in its own dtype and device; the random signs
    depend only on the shape, so every process and device computes the same ones.
    """
    out_features, in_features = weight.shape
    generator = torch.Generator().manual_seed(_SEED + 1_000_003 * out_features + in_features)
    inputs = _signs(in_features, 1, generator)[0]
    outputs = _signs(out_features, FINGERPRINT_SIZE, generator)
    projected = weight.detach() @ inputs.to(weight.device, weight.dtype)  # [out], accumulated by the backend
    return outputs @ projected.float().cpu()


def readable_here(weight: torch.Tensor) -> bool:
    """Whether this process holds ``weight`` whole: not meta, not a ZeRO-3 partition, not an FSDP2 ``DTensor``
    shard. Reading a sharded weight would be a collective; the load-time check skips such weights."""
    if weight.is_meta or (hasattr(weight, "ds_id") and hasattr(weight, "ds_shape")):
        return False
    return type(weight).__name__ != "DTensor" and weight.dim() == 2


def not_recorded() -> torch.Tensor:
    """The placeholder of an adapter without a fingerprint (saved before they existed)."""
    return torch.zeros(FINGERPRINT_SIZE)


def is_recorded(fingerprint: torch.Tensor | None) -> bool:
    return fingerprint is not None and fingerprint.numel() == FINGERPRINT_SIZE and bool(fingerprint.abs().sum() > 0)


def fingerprint_distance(recorded: torch.Tensor, actual: torch.Tensor) -> float:
    recorded, actual = recorded.float().cpu(), actual.float().cpu()
    return float((recorded - actual).norm() / recorded.norm().clamp_min(1e-30))


def mismatch_allowed() -> bool:
    """Whether the user set ``NEUROADA_ALLOW_BASE_MISMATCH=1`` (the override for PEFT loading)."""
    return os.environ.get(OVERRIDE_ENV, "").strip().lower() in ("1", "true", "yes")


def check_fingerprint(
    recorded: torch.Tensor | None, weight: torch.Tensor, *, where: str, allow: bool, override: str
) -> float | None:
    """Compare ``recorded`` with ``weight``'s fingerprint; the distance, or ``None`` when none was recorded.

    Raises :class:`BaseMismatchError` above :data:`TOLERANCE` unless ``allow`` (``override`` says how).
    """
    if not is_recorded(recorded):
        return None
    distance = fingerprint_distance(recorded, weight_fingerprint(weight))
    if distance > TOLERANCE and not allow:
        raise BaseMismatchError(
            f"{where}: the adapter was created on other base weights: the fingerprint of this layer's weight is "
            f"{distance:.2f} away from the one recorded in the adapter (the same model in another dtype or "
            f"quantized to 4 bits stays below {TOLERANCE}; another model is ~1.4). Use the base model the adapter "
            f"was trained from (adapter_config.json: base_model_name_or_path), or {override} if you know it fits."
        )
    return distance


_PENDING = "_neuroada_base_mismatches"


def check_loaded_fingerprints(
    layer: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    prefix: str,
    *,
    adapter_key: str,
    fingerprint_key: str,
    read_weight: Callable[[], AbstractContextManager[torch.Tensor]] | None,
    where: str,
) -> None:
    """A tuner layer's ``_load_from_state_dict`` step: compare every adapter being loaded with this base weight.

    ``adapter_key``/``fingerprint_key``: the layer's attribute names of one always-present adapter tensor and of
    the fingerprint buffer (``neuroada_theta`` / ``neuroada_fingerprint``). A file without a fingerprint (saved
    before they existed) gets the "not recorded" placeholder, so PEFT does not report it missing.
    ``read_weight``: the weight as the method reads it, or ``None`` where it cannot be read here (meta,
    ZeRO-3 partition, FSDP2 shard): then nothing is compared. Mismatches are kept on the layer and
    raised together by :func:`raise_pending_mismatches` once the whole model is loaded, so that a file
    for other shapes is reported as such by the shape checks of the layers that follow.
    """
    adapters = [
        key[len(prefix) + len(adapter_key) + 1 :] for key in state_dict if key.startswith(f"{prefix}{adapter_key}.")
    ]
    for name in adapters:
        key = f"{prefix}{fingerprint_key}.{name}"
        if key not in state_dict:
            state_dict[key] = not_recorded()
        elif read_weight is not None and is_recorded(state_dict[key]) and not mismatch_allowed():
            with read_weight() as weight:
                distance = fingerprint_distance(state_dict[key], weight_fingerprint(weight))
            if distance > TOLERANCE:
                layer.__dict__.setdefault(_PENDING, []).append((f"{where}, adapter {name!r}", distance))


def raise_pending_mismatches(model: torch.nn.Module) -> None:
    """After a load: raise one :class:`BaseMismatchError` for every layer whose base differed (unless overridden)."""
    found = [entry for module in model.modules() for entry in module.__dict__.pop(_PENDING, [])]
    if not found or mismatch_allowed():
        return
    shown = "; ".join(f"{where}: {distance:.2f}" for where, distance in found[:3])
    more = f" (+{len(found) - 3} more)" if len(found) > 3 else ""
    raise BaseMismatchError(
        f"The adapter was created on other base weights: in {len(found)} adapted layer(s) the fingerprint of the "
        f"base weight is far from the one the adapter recorded ({shown}{more}; the same model in another dtype or "
        f"quantized to 4 bits stays below {TOLERANCE}, another model is ~1.4). Load the base model the adapter was "
        f"trained from (adapter_config.json: base_model_name_or_path), or set {OVERRIDE_ENV}=1 if you know it fits."
    )

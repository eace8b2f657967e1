"""The NeFT selection file: which neurons of which layers to train, and the model they were chosen on.

Written by ``neuroada-plugin neft-select`` (atomically), read by ``NeftConfig(selection_file=...)``. JSON::

    {"format": "neuroada-plugin/neft-selection", "version": 1,
     "model": "<what --model named>", "criterion": "<the scoring rule, in words>", "budget": {...},
     "reference_run": {...}, "command": "...",
     "modules": {"model.layers.0.mlp.up_proj": {"axis": "rows", "shape": [out, in],
                                               "fingerprint": [16 floats], "neurons": [3, 17, ...]}, ...}}

Each module records the fingerprint of its weight (:mod:`neuroada_plugin.kit.fingerprint`), so applying
the file to another model fails naming the layer. Torch only.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..kit.fingerprint import TOLERANCE, fingerprint_distance, mismatch_allowed, weight_fingerprint
from .functional import AXES

__all__ = ["FORMAT", "SelectionFile", "SelectionFileError", "read_selection", "write_selection"]

FORMAT = "neuroada-plugin/neft-selection"
VERSION = 1


class SelectionFileError(ValueError):
    """A selection file that cannot be used: unreadable, malformed, or made for another model."""


@dataclass(frozen=True)
class ModuleSelection:
    axis: str
    shape: tuple[int, int]
    fingerprint: torch.Tensor
    neurons: torch.Tensor


@dataclass(frozen=True)
class SelectionFile:
    path: Path
    modules: dict[str, ModuleSelection]
    meta: dict[str, Any]

    def check_weight(self, module: str, weight: torch.Tensor) -> None:
        """Refuse ``weight`` (the full base weight of ``module``) when the file was made on another one."""
        entry = self.modules[module]
        if tuple(weight.shape) != entry.shape:
            raise SelectionFileError(
                f"NeFT selection file {self.path}: layer {module} has a {list(weight.shape)} weight here, but the file "
                f"was made on a {list(entry.shape)} one (model {self.meta.get('model')!r}). Run neft-select on this "
                "model."
            )
        distance = fingerprint_distance(entry.fingerprint, weight_fingerprint(weight))
        if distance > TOLERANCE and not mismatch_allowed():
            raise SelectionFileError(
                f"NeFT selection file {self.path}: layer {module}'s weight differs from the one the neurons were "
                f"chosen on (fingerprint distance {distance:.2f} > {TOLERANCE}; model {self.meta.get('model')!r}). "
                "Run neft-select on this model (or set NEUROADA_ALLOW_BASE_MISMATCH=1 if this is intended)."
            )


def write_selection(path: str | Path, modules: dict[str, dict[str, Any]], meta: dict[str, Any]) -> Path:
    """Write the file atomically (a temporary file in the same folder, then renamed): never a partial file."""
    path = Path(path)
    payload = {"format": FORMAT, "version": VERSION, **meta, "modules": modules}
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(payload, stream, indent=1)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            from ..merge.errors import InsufficientSpaceError

            raise InsufficientSpaceError(f"No space left to write {path}; nothing was written.") from error
        raise
    return path


def read_selection(path: str | Path) -> SelectionFile:
    """Read and check a selection file (format, version, per-module entries); :class:`SelectionFileError` if bad."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        raise SelectionFileError(
            f"NeFT selection file {path} does not exist. Make one with `neuroada-plugin neft-select --model ... "
            f"--data ... --output {path}`."
        ) from None
    except (OSError, ValueError) as error:
        raise SelectionFileError(f"NeFT selection file {path} cannot be read as JSON: {error}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise SelectionFileError(f"{path} is not a NeFT selection file (no \"format\": \"{FORMAT}\").")
    if payload.get("version") != VERSION:
        raise SelectionFileError(f"{path}: selection file version {payload.get('version')!r}; this package reads {VERSION}.")
    raw = payload.get("modules")
    if not isinstance(raw, dict) or not raw:
        raise SelectionFileError(f"{path}: \"modules\" must map layer names to their selected neurons.")
    modules = {}
    for name, entry in raw.items():
        try:
            axis, shape = entry["axis"], tuple(int(v) for v in entry["shape"])
            neurons = torch.tensor(entry["neurons"], dtype=torch.int64)
            fingerprint = torch.tensor(entry["fingerprint"], dtype=torch.float32)
        except (KeyError, TypeError, ValueError) as error:
            raise SelectionFileError(f"{path}: layer {name}: malformed entry ({error!r}).") from None
        if axis not in AXES or len(shape) != 2 or neurons.dim() != 1:
            raise SelectionFileError(f"{path}: layer {name}: axis must be one of {AXES} and shape [out, in].")
        count = shape[0] if axis == "rows" else shape[1]
        if neurons.numel() and (int(neurons.min()) < 0 or int(neurons.max()) >= count):
            raise SelectionFileError(f"{path}: layer {name}: neuron indices outside 0..{count - 1}.")
        if neurons.unique().numel() != neurons.numel():
            raise SelectionFileError(f"{path}: layer {name}: repeated neuron indices.")
        modules[name] = ModuleSelection(axis, shape, fingerprint, neurons.sort().values)
    meta = {k: v for k, v in payload.items() if k != "modules"}
    return SelectionFile(path, modules, meta)

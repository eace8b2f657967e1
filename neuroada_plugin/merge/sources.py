"""The merge's inputs: the base checkpoint (shards scanned, headers only) and the adapter (loaded, checked).

Everything here reads; nothing writes. Errors name the file and say what to do.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterCheckpointError, MergeError
from .errors import CheckpointFileError
from .rules import BaseTensorInfo
from .safetensors_io import SafetensorsHeader, TensorEntry, read_header, read_tensor

__all__ = [
    "ADAPTER_CONFIG",
    "SAFE_INDEX",
    "SAFE_SINGLE",
    "TOKENIZER_FILE",
    "AdapterCheckpoint",
    "BaseCheckpoint",
    "load_adapter",
    "read_json",
    "resolve_folder",
    "scan_base_checkpoint",
    "support_files",
]

PEFT_PREFIX = "base_model.model."
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MERGE_INFO = "merge_info.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".npz")
# Tokenizer and chat-template files (what TRL saves next to an adapter), by name.
TOKENIZER_FILE = re.compile(
    r"(tokenizer.*|special_tokens_map\.json|added_tokens\.json|chat_template\.(jinja|json)|vocab\.(json|txt)|merges\.txt"
    r"|spiece\.model|sentencepiece.*\.model)"
)


def resolve_folder(spec: str | os.PathLike, what: str, allow_patterns: list[str] | None = None) -> Path:
    """A local folder, or a hub repo id downloaded to the hub cache (only when a hub is reachable)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise CheckpointFileError(f"{what} {str(spec)!r} is a file; pass the folder that contains it.")
    text = str(spec)
    looks_like_repo = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", text) is not None and not text.startswith((".", "/", "~"))
    if not looks_like_repo:
        raise CheckpointFileError(f"{what} folder {text!r} does not exist.")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=text, allow_patterns=allow_patterns))
    except Exception as error:  # offline mode, no network, unknown repo, auth...
        raise CheckpointFileError(
            f"{what} {text!r} is not a local folder, and downloading it as a hub repo id failed "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). Pass a local folder, or "
            "unset HF_HUB_OFFLINE on a machine that can reach the hub."
        ) from error


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointFileError(f"{path}: cannot be read as JSON ({error}).") from error
    if not isinstance(value, dict):
        raise CheckpointFileError(f"{path}: expected a JSON object.")
    return value


# ----------------------------------------------------------------------------- base checkpoint


@dataclass
class BaseCheckpoint:
    """A base model folder, scanned and validated: shards, tensor locations, config."""

    folder: Path
    config: dict[str, Any]
    shards: list[SafetensorsHeader]
    index_file: Path | None
    tensors: dict[str, BaseTensorInfo]
    entries: dict[str, TensorEntry]

    @property
    def total_bytes(self) -> int:
        return sum(s.file_size for s in self.shards)

    def main_dtype(self) -> str:
        """The safetensors dtype holding most of the floating-point bytes (``"BF16"``), for the merge record."""
        sizes: dict[str, int] = {}
        for entry in self.entries.values():
            if entry.torch_dtype is not None and entry.torch_dtype.is_floating_point:
                sizes[entry.dtype] = sizes.get(entry.dtype, 0) + entry.nbytes
        return max(sizes, key=sizes.__getitem__) if sizes else "none"


def scan_base_checkpoint(folder: Path, what: str = "Base") -> BaseCheckpoint:
    """Find and validate every safetensors shard of ``folder`` (reads headers only); ``what`` names it in errors."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointFileError(f"{what} folder {folder} has no config.json; it is not a Hugging Face model folder.")
    config = read_json(config_path)
    index_path = folder / SAFE_INDEX
    if index_path.is_file():
        index = read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointFileError(f"{index_path}: no 'weight_map' (corrupted shard index).")
        shard_names = sorted(set(weight_map.values()))
        missing = [name for name in shard_names if not (folder / name).is_file()]
        if missing:
            raise CheckpointFileError(
                f"{what} checkpoint {folder} is incomplete: shard(s) {', '.join(missing)} listed in {SAFE_INDEX} are "
                "missing. Re-download or re-save it."
            )
    elif (folder / SAFE_SINGLE).is_file():
        index_path, weight_map, shard_names = None, None, [SAFE_SINGLE]
    else:
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        hint = (
            f" It has {', '.join(others[:3])}: re-save it as safetensors (model.save_pretrained(dir)) first."
            if others
            else ""
        )
        raise CheckpointFileError(f"{what} folder {folder} has no {SAFE_SINGLE} or {SAFE_INDEX}.{hint}")

    shards = [read_header(folder / name) for name in shard_names]
    tensors: dict[str, BaseTensorInfo] = {}
    entries: dict[str, TensorEntry] = {}
    for shard in shards:
        for entry in shard.tensors:
            if entry.name in entries:
                raise CheckpointFileError(
                    f"{what} checkpoint {folder}: tensor {entry.name!r} is stored twice ({entries[entry.name]} and "
                    f"{shard.path.name})."
                )
            entries[entry.name] = entry
            tensors[entry.name] = BaseTensorInfo(entry.name, entry.shape, entry.torch_dtype, shard.path)
    if weight_map is not None:
        for name, shard_name in weight_map.items():
            if name not in entries or tensors[name].file.name != shard_name:
                raise CheckpointFileError(
                    f"{index_path}: maps tensor {name!r} to {shard_name}, but that shard does not contain it "
                    "(index and shards are out of sync)."
                )
    return BaseCheckpoint(folder, config, shards, index_path, tensors, entries)


# ----------------------------------------------------------------------------- adapter


@dataclass
class AdapterCheckpoint:
    """A loaded adapter: its config and its tensors, keys normalised to base-model tensor paths.

    ``tensors`` keys carry no ``base_model.model.`` prefix, e.g.
    ``model.layers.0.self_attn.q_proj.neuroada_theta``; adapters are small, so all tensors are
    in memory.
    """

    path: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    weights_file: Path

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", "")).upper()


def load_adapter(folder: Path) -> AdapterCheckpoint:
    """Read ``adapter_config.json`` and the adapter weights; normalise keys; refuse NaN/inf values.

    Accepts what PEFT, TRL and Axolotl write (``adapter_model.safetensors`` with
    ``base_model.model.``-prefixed keys), keys without that prefix, and the legacy
    ``adapter_model.bin``.
    """
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        raise CheckpointFileError(
            f"Adapter folder {folder} has no {ADAPTER_CONFIG}; pass the folder written by save_pretrained "
            "(for TRL/Axolotl: the output_dir or a checkpoint-N folder)."
        )
    config = read_json(config_path)
    weights = next((folder / name for name in ADAPTER_WEIGHTS if (folder / name).is_file()), None)
    if weights is None:
        raise CheckpointFileError(f"Adapter folder {folder} has no {' or '.join(ADAPTER_WEIGHTS)}.")
    if weights.suffix == ".safetensors":
        header = read_header(weights)  # clear errors for truncated/corrupted files
        with open(weights, "rb") as handle:
            raw = {entry.name: read_tensor(handle, entry) for entry in header.tensors}
    else:
        try:
            raw = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as error:
            raise CheckpointFileError(f"{weights}: cannot be read ({type(error).__name__}: {error}).") from error
        if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
            raise CheckpointFileError(f"{weights}: expected a state dict of tensors, found {type(raw).__name__}.")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        name = key.removeprefix(PEFT_PREFIX)
        if name in tensors:
            raise AdapterCheckpointError(f"{weights}: key {name!r} appears twice (with and without {PEFT_PREFIX!r}).")
        if value.is_floating_point() and value.numel():
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                raise MergeError(
                    f"{weights}: adapter tensor {key!r} holds {int((~finite).sum())} non-finite value(s) (NaN/inf); "
                    "merging it would write them into the model. The adapter is broken (did training diverge?). "
                    "No output was written."
                )
        tensors[name] = value
    return AdapterCheckpoint(path=folder, config=config, tensors=tensors, weights_file=weights)


# ----------------------------------------------------------------------------- other files


def support_files(base: Path, adapter: Path, tokenizer: str) -> tuple[dict[str, Path], str]:
    """Non-weight files to copy (config, generation config, tokenizer, README, ...): name -> source.

    Returns the files and where the tokenizer comes from (``"base"`` or ``"adapter"``).
    """

    def regular(folder: Path) -> list[Path]:
        return [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]

    files = {
        p.name: p
        for p in regular(base)
        if not p.name.endswith(_WEIGHT_SUFFIXES)
        and p.name not in (SAFE_INDEX, MERGE_INFO)
        and not p.name.startswith("adapter_")
    }
    source = "base"
    adapter_tokenizer = {p.name: p for p in regular(adapter) if TOKENIZER_FILE.fullmatch(p.name)}
    has_adapter_tokenizer = "tokenizer_config.json" in adapter_tokenizer
    if tokenizer == "adapter" and not has_adapter_tokenizer:
        raise CheckpointFileError(f"--tokenizer adapter: adapter folder {adapter} has no tokenizer_config.json.")
    if tokenizer == "adapter" or (tokenizer == "auto" and has_adapter_tokenizer):
        for name in [n for n in files if TOKENIZER_FILE.fullmatch(n)]:
            del files[name]
        files.update(adapter_tokenizer)
        source = "adapter"
    return files, source

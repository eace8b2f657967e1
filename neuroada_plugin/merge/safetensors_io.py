"""Just enough of the safetensors format to stream a checkpoint tensor by tensor.

Why not ``safetensors.torch.load_file``/``save_file``: those hold a whole shard in memory,
while the merge only needs to change a few tensors and can copy every other byte range
verbatim. A safetensors file is ``u64-le header length N | N bytes of JSON header | data``;
the header maps each tensor name to ``dtype``, ``shape`` and ``data_offsets`` (relative to
the data section). Because a merged tensor keeps its dtype and shape, the output file reuses
the input header byte for byte and only the patched byte ranges differ; a resized vocabulary
changes an embedding's shape, and then :func:`header_bytes` writes the shard a new header.

Everything a corrupted or truncated file could get wrong (header length, JSON, offsets,
sizes, overlaps, file length) is checked by :func:`read_header` before any output is written.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointFileError

__all__ = ["DTYPES", "SafetensorsHeader", "TensorEntry", "header_bytes", "read_header", "read_tensor", "tensor_bytes"]

# safetensors dtype tag -> (element size in bytes, torch dtype or None when torch lacks it).
DTYPES: dict[str, tuple[int, torch.dtype | None]] = {
    "F64": (8, torch.float64),
    "F32": (4, torch.float32),
    "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16),
    "I64": (8, torch.int64),
    "I32": (4, torch.int32),
    "I16": (2, torch.int16),
    "I8": (1, torch.int8),
    "U8": (1, torch.uint8),
    "BOOL": (1, torch.bool),
    "U16": (2, getattr(torch, "uint16", None)),
    "U32": (4, getattr(torch, "uint32", None)),
    "U64": (8, getattr(torch, "uint64", None)),
    "F8_E4M3": (1, getattr(torch, "float8_e4m3fn", None)),
    "F8_E5M2": (1, getattr(torch, "float8_e5m2", None)),
}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: where its bytes are and how to read them."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int  # absolute file offset one past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return DTYPES[self.dtype][1]


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed, validated header: tensors in file order plus the raw header bytes to reuse."""

    path: Path
    raw: bytes  # the 8-byte length prefix and the JSON header, exactly as in the file
    tensors: tuple[TensorEntry, ...]
    metadata: dict[str, str]
    file_size: int

    @property
    def data_start(self) -> int:
        return len(self.raw)


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and validate the header of ``path``; raise :class:`CheckpointFileError` naming the problem.

    Checks: the file exists and is long enough for its header; the header is a JSON object;
    every entry has a known dtype, a non-negative shape and offsets whose length matches
    ``prod(shape) * itemsize``; entries do not overlap and leave no hole; the data section
    ends exactly at the end of the file (a truncated download or an interrupted copy is
    caught here, not halfway through writing the merged model).
    """
    path = Path(path)
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointFileError(
                    f"{path}: not a safetensors file ({file_size} bytes, shorter than the header)."
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER or 8 + header_len > file_size:
                raise CheckpointFileError(
                    f"{path}: corrupted or truncated safetensors file: the header claims {header_len} bytes but the "
                    f"file has {file_size} bytes in all."
                )
            header_bytes = handle.read(header_len)
    except FileNotFoundError as error:
        raise CheckpointFileError(f"{path}: file not found.") from error
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointFileError(f"{path}: corrupted safetensors header (not valid JSON: {error}).") from error
    if not isinstance(header, dict):
        raise CheckpointFileError(
            f"{path}: corrupted safetensors header (a JSON {type(header).__name__}, not an object)."
        )

    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    entries: list[TensorEntry] = []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
            begin, end = int(begin), int(end)
        except (TypeError, KeyError, ValueError) as error:
            raise CheckpointFileError(
                f"{path}: corrupted safetensors header entry for tensor {name!r}: {info!r}."
            ) from error
        if dtype not in DTYPES:
            raise CheckpointFileError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}.")
        expected = math.prod(shape) * DTYPES[dtype][0]
        if any(d < 0 for d in shape) or begin < 0 or end - begin != expected:
            raise CheckpointFileError(
                f"{path}: corrupted safetensors header: tensor {name!r} ({dtype}, shape {shape}) needs {expected} "
                f"bytes but its offsets [{begin}, {end}) span {end - begin}."
            )
        entries.append(TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end))
    entries.sort(key=lambda e: (e.begin, e.end))
    cursor = data_start
    for entry in entries:
        if entry.begin != cursor:
            raise CheckpointFileError(
                f"{path}: corrupted safetensors header: tensor {entry.name!r} starts at data offset "
                f"{entry.begin - data_start}, expected {cursor - data_start} (overlap or hole)."
            )
        cursor = entry.end
    if cursor != file_size:
        problem = "truncated" if cursor > file_size else "has trailing bytes"
        raise CheckpointFileError(
            f"{path}: {problem}: the header says the data ends at byte {cursor}, but the file has {file_size} bytes."
        )
    return SafetensorsHeader(
        path=path,
        raw=prefix + header_bytes,
        tensors=tuple(entries),
        metadata={str(k): str(v) for k, v in metadata.items()},
        file_size=file_size,
    )


def read_tensor(handle, entry: TensorEntry) -> torch.Tensor:
    """Read one tensor from an open file into a fresh, writable CPU tensor (copy of its bytes)."""
    torch_dtype = entry.torch_dtype
    if torch_dtype is None:
        raise CheckpointFileError(f"tensor {entry.name!r}: dtype {entry.dtype} is not supported by this torch build.")
    buffer = bytearray(entry.nbytes)
    handle.seek(entry.begin)
    view = memoryview(buffer)
    read = 0
    while read < entry.nbytes:
        got = handle.readinto(view[read:])
        if not got:
            raise CheckpointFileError(f"tensor {entry.name!r}: file ended while reading its bytes (truncated?).")
        read += got
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=torch_dtype)
    return torch.frombuffer(buffer, dtype=torch_dtype).reshape(entry.shape)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without copying when it is contiguous."""
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def header_bytes(header: SafetensorsHeader, shapes: dict[str, tuple[int, ...]]) -> bytes:
    """The length prefix and JSON header of ``header``'s file with some tensors' ``shapes`` changed.

    Tensors keep their file order, dtypes and metadata; offsets follow the new sizes. The JSON is
    padded with spaces to a multiple of 8 bytes, as the reference implementation writes it.
    """
    entries: dict[str, object] = {"__metadata__": header.metadata} if header.metadata else {}
    offset = 0
    for entry in header.tensors:
        shape = tuple(shapes.get(entry.name, entry.shape))
        size = math.prod(shape) * DTYPES[entry.dtype][0]
        entries[entry.name] = {"dtype": entry.dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text

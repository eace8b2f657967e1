"""Streaming checkpoint merge: base checkpoint + adapter -> an ordinary Hugging Face checkpoint.

Why streaming: ``PeftModel.merge_and_unload()`` + ``save_pretrained`` needs the whole model in
memory (and often a second copy while saving). A sparse adapter changes a tiny fraction of a
few tensors, so the merge here copies every untouched byte range of each safetensors shard
verbatim and decodes only the tensors an adapter patches. Peak memory is about the largest
patched tensor, not the model; output shards are byte-identical to the input except inside
patched tensors, so headers, shard names and the shard index are reused unchanged.

Safety: everything is validated before the first output byte (adapter keys map to existing
base tensors, shapes and index ranges fit, every shard is present and its header consistent
with its length, enough free disk). Output goes to a hidden staging folder next to the target
and is renamed into place only when complete and fsync-ed; any failure (bad values, disk full,
Ctrl-C, SIGTERM) removes the staging folder. A SIGKILL cannot be caught: the clearly named
staging folder it leaves is removed by the next run for the same output.

The engine is method-agnostic: what an adapter does to a tensor comes from the rule registered
for its ``peft_type`` (:mod:`.registry`).
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterCheckpointError
from .errors import CheckpointFileError, InsufficientSpaceError, OutputExistsError
from .registry import AdapterCheckpoint, BaseTensorInfo, TensorPatch, get_checkpoint_rule
from .safetensors_io import SafetensorsHeader, TensorEntry, read_header, read_tensor, tensor_bytes

__all__ = [
    "BaseCheckpoint",
    "MergeReport",
    "load_adapter",
    "merge_adapter_checkpoint",
    "plan_merge",
    "resolve_folder",
    "scan_base_checkpoint",
    "staging_prefix",
]

PEFT_PREFIX = "base_model.model."
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".npz")
_TOKENIZER_FILE = re.compile(
    r"(tokenizer.*|special_tokens_map\.json|added_tokens\.json|chat_template\.(jinja|json)|vocab\.(json|txt)|merges\.txt"
    r"|spiece\.model|sentencepiece.*\.model)"
)
_OUTPUT_EMBEDDINGS = ("lm_head.weight", "embed_out.weight", "output.weight")
_INPUT_EMBEDDING_SUFFIXES = (
    "embed_tokens.weight",
    "wte.weight",
    "embed_in.weight",
    "word_embeddings.weight",
    "tok_embeddings.weight",
)
_COPY_CHUNK = 16 * 1024 * 1024
_TMP_TAG = "neuroada-merge-tmp"
_OLD_TAG = "neuroada-merge-old"

Log = Callable[[str], None]


# ----------------------------------------------------------------------------- inputs


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


def scan_base_checkpoint(folder: Path) -> BaseCheckpoint:
    """Find and validate every safetensors shard of ``folder`` (reads headers only)."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointFileError(f"Base folder {folder} has no config.json; it is not a Hugging Face model folder.")
    config = _read_json(config_path)
    index_path = folder / SAFE_INDEX
    if index_path.is_file():
        index = _read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointFileError(f"{index_path}: no 'weight_map' (corrupted shard index).")
        shard_names = sorted(set(weight_map.values()))
        missing = [name for name in shard_names if not (folder / name).is_file()]
        if missing:
            raise CheckpointFileError(
                f"Base checkpoint {folder} is incomplete: shard(s) {', '.join(missing)} listed in {SAFE_INDEX} are "
                "missing. Re-download or re-save the base model."
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
        raise CheckpointFileError(f"Base folder {folder} has no {SAFE_SINGLE} or {SAFE_INDEX}.{hint}")

    shards = [read_header(folder / name) for name in shard_names]
    tensors: dict[str, BaseTensorInfo] = {}
    entries: dict[str, TensorEntry] = {}
    for shard in shards:
        for entry in shard.tensors:
            if entry.name in entries:
                raise CheckpointFileError(
                    f"Base checkpoint {folder}: tensor {entry.name!r} is stored twice ({entries[entry.name]} and "
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


def load_adapter(folder: Path) -> AdapterCheckpoint:
    """Read ``adapter_config.json`` and the adapter weights; normalise keys to base tensor paths.

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
    config = _read_json(config_path)
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
        if not isinstance(raw, dict):
            raise CheckpointFileError(f"{weights}: expected a state dict, found {type(raw).__name__}.")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        name = key.removeprefix(PEFT_PREFIX)
        if name in tensors:
            raise AdapterCheckpointError(f"{weights}: key {name!r} appears twice (with and without {PEFT_PREFIX!r}).")
        tensors[name] = value
    return AdapterCheckpoint(path=folder, config=config, tensors=tensors, weights_file=weights)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointFileError(f"{path}: cannot be read as JSON ({error}).") from error
    if not isinstance(value, dict):
        raise CheckpointFileError(f"{path}: expected a JSON object.")
    return value


# ----------------------------------------------------------------------------- planning


def plan_merge(adapter: AdapterCheckpoint, base: BaseCheckpoint) -> dict[str, list[TensorPatch]]:
    """Validate ``adapter`` against ``base`` and return base tensor name -> patches (in order).

    Uses the rule of the adapter's ``peft_type``; adds full-tensor replacements for
    ``modules_to_save`` entries; redirects a patch of a tied output embedding that the
    checkpoint does not store to the input embedding it is tied to (and patches both when
    both are stored); fails if any adapter tensor is left unexplained.
    """
    if not adapter.peft_type:
        raise AdapterCheckpointError(f"{adapter.path / ADAPTER_CONFIG}: no 'peft_type'.")
    rule = get_checkpoint_rule(adapter.peft_type)
    method_patches = list(rule(adapter, base.tensors))
    used = {key for patch in method_patches for key in patch.sources}
    # Full copies come first: PEFT saves the base weight of an adapted embedding-like layer
    # (e.g. a tied lm_head) as "<module>.base_layer.weight", and loading restores it before
    # the adapter acts; modules_to_save replace a whole module.
    patches = _full_copy_patches(adapter, base, used) + method_patches
    used = {key for patch in patches for key in patch.sources}
    unused = sorted(set(adapter.tensors) - used)
    if unused:
        shown = ", ".join(unused[:5]) + (f" (+{len(unused) - 5} more)" if len(unused) > 5 else "")
        extra = (
            " Trainable-token / resized-embedding adapters are not supported by the streaming merge; use "
            "PeftModel.merge_and_unload() for those."
            if any("token_adapter" in k or "trainable_tokens" in k for k in unused)
            else ""
        )
        raise AdapterCheckpointError(
            f"{adapter.weights_file}: {len(unused)} tensor(s) do not correspond to anything the "
            f"{adapter.peft_type} merge rule or modules_to_save understands: {shown}.{extra}"
        )

    plan: dict[str, list[TensorPatch]] = {}
    tied = _tied_embeddings(base)
    for patch in patches:
        targets = [patch.target]
        if patch.target in tied:
            partner = tied[patch.target]
            targets = [t for t in (patch.target, partner) if t in base.tensors]
        if not any(t in base.tensors for t in targets):
            raise AdapterCheckpointError(
                f"Adapter and base model do not match: adapter tensor(s) {', '.join(patch.sources)} apply to base "
                f"tensor {patch.target!r}, which base checkpoint {base.folder} does not contain. The adapter was "
                "trained on a different base model (or the base checkpoint is incomplete)."
            )
        for target in targets:
            patch.check(base.tensors[target])
            plan.setdefault(target, []).append(patch)
    return plan


def _full_copy_patches(adapter: AdapterCheckpoint, base: BaseCheckpoint, used: set[str]) -> list[TensorPatch]:
    """Patches that overwrite a whole base tensor: ``modules_to_save`` entries and saved ``base_layer`` weights."""
    modules = adapter.config.get("modules_to_save") or []
    tied = _tied_embeddings(base)
    patches = []
    for key, value in adapter.tensors.items():
        if key in used:
            continue
        match = re.fullmatch(r"(?P<module>.+)\.base_layer\.(?P<param>weight|bias)", key)
        if match:
            target, why = f"{match['module']}.{match['param']}", "saved base_layer weight (full copy)"
        else:
            module = key.rsplit(".", 1)[0]
            if not any(module == m or module.endswith(f".{m}") for m in modules):
                continue
            target, why = key, "modules_to_save (full copy)"
        if target not in base.tensors and tied.get(target) not in base.tensors:
            continue  # left unused: reported with the other unexplained keys
        info = base.tensors.get(target) or base.tensors[tied[target]]
        if tuple(value.shape) != info.shape:
            raise AdapterCheckpointError(
                f"Adapter and base model do not match: adapter tensor {key!r} ({why}) has shape {list(value.shape)}, "
                f"base tensor {info.name!r} in {info.file.name} has shape {list(info.shape)}."
            )
        patches.append(
            TensorPatch(
                target=target,
                sources=(key,),
                apply=lambda old, new=value: new.to(old.dtype).clone(),
                description=why,
            )
        )
    return patches


def _tied_embeddings(base: BaseCheckpoint) -> dict[str, str]:
    """Output embedding <-> input embedding names when the config ties them, else empty."""
    config = base.config
    tie = config.get("tie_word_embeddings")
    if tie is None and isinstance(config.get("text_config"), dict):
        tie = config["text_config"].get("tie_word_embeddings")
    if not tie:
        return {}
    inputs = [n for n in base.tensors if n.endswith(_INPUT_EMBEDDING_SUFFIXES)]
    if len(inputs) != 1:
        return {}
    mapping = {}
    for output in _OUTPUT_EMBEDDINGS:
        mapping[output] = inputs[0]
        mapping.setdefault(inputs[0], output)
    return mapping


# ----------------------------------------------------------------------------- output


def staging_prefix(output: Path) -> str:
    """Name prefix of the hidden staging folders a merge into ``output`` creates next to it."""
    return f".{output.name}.{_TMP_TAG}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(output: Path, log: Log) -> None:
    """Remove staging/backup folders left by merges into ``output`` whose process is gone (SIGKILL, crash)."""
    parent = output.parent
    if not parent.is_dir():
        return
    for tag in (_TMP_TAG, _OLD_TAG):
        for path in parent.glob(f".{output.name}.{tag}.*"):
            match = re.fullmatch(rf"\.{re.escape(output.name)}\.{tag}\.(\d+)\.\w+", path.name)
            if match and not _pid_alive(int(match[1])):
                log(f"[neuroada-merge] removing {path.name}, left by an interrupted merge (pid {match[1]})")
                shutil.rmtree(path, ignore_errors=True)


def _write_chunk(handle, data) -> None:
    """All output bytes go through here (one place to count them, and for tests to simulate a full disk)."""
    handle.write(data)


def _support_files(base: Path, adapter: Path, tokenizer: str) -> tuple[dict[str, Path], str]:
    """Non-weight files to copy (config, generation config, tokenizer, README, ...): name -> source."""

    def regular(folder: Path) -> list[Path]:
        return [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]

    files = {
        p.name: p
        for p in regular(base)
        if not p.name.endswith(_WEIGHT_SUFFIXES) and p.name != SAFE_INDEX and not p.name.startswith("adapter_")
    }
    source = "base"
    adapter_tokenizer = {p.name: p for p in regular(adapter) if _TOKENIZER_FILE.fullmatch(p.name)}
    has_adapter_tokenizer = "tokenizer_config.json" in adapter_tokenizer
    if tokenizer == "adapter" and not has_adapter_tokenizer:
        raise CheckpointFileError(f"--tokenizer adapter: adapter folder {adapter} has no tokenizer_config.json.")
    if tokenizer == "adapter" or (tokenizer == "auto" and has_adapter_tokenizer):
        for name in [n for n in files if _TOKENIZER_FILE.fullmatch(n)]:
            del files[name]
        files.update(adapter_tokenizer)
        source = "adapter"
    return files, source


@dataclass
class MergeReport:
    """What a merge did (returned by :func:`merge_adapter_checkpoint`, printed by the CLI)."""

    output: Path
    peft_type: str
    shards: int
    tensors: int
    patched_tensors: int
    patches: int
    bytes_written: int
    seconds: float
    tokenizer_from: str
    verification: dict[str, Any] | None = field(default=None)

    def summary(self) -> str:
        text = (
            f"merged {self.peft_type} adapter into {self.output}: {self.patched_tensors}/{self.tensors} tensors "
            f"changed in {self.shards} shard(s), {self.bytes_written / 1e6:.1f} MB written in {self.seconds:.2f} s "
            f"(tokenizer from {self.tokenizer_from})"
        )
        if self.verification:
            text += f"; verify: {self.verification.get('summary', '')}"
        return text


def merge_adapter_checkpoint(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    output: str | os.PathLike,
    *,
    force: bool = False,
    progress: bool = True,
    tokenizer: str = "auto",
    verify: bool = False,
    log: Log | None = print,
) -> MergeReport:
    """Merge the adapter in ``adapter`` into the base checkpoint ``base``; write an ordinary checkpoint to ``output``.

    Args:
        base: Base model folder with ``config.json`` and safetensors weights (one file or
            sharded with ``model.safetensors.index.json``), or a hub repo id.
        adapter: Adapter folder written by ``save_pretrained`` (PEFT, TRL, Axolotl), or a hub id.
        output: Folder to create. Written atomically (staging folder + rename).
        force: Replace ``output`` if it exists (otherwise :class:`OutputExistsError`).
        progress: Show a tqdm progress bar (bytes written).
        tokenizer: ``"auto"`` (the adapter's tokenizer files if it has any, else the base's),
            ``"base"`` or ``"adapter"``.
        verify: Before the output is put in place, load it and compare it with the unmerged adapter
            (loads the whole model; see :mod:`.verify`). A failed verification raises
            :class:`~.verify.VerificationError` and leaves no output.
        log: Callable for progress messages (``None``: silent).

    Returns:
        A :class:`MergeReport`.
    """
    say: Log = log or (lambda message: None)
    if tokenizer not in ("auto", "base", "adapter"):
        raise ValueError(f"tokenizer must be 'auto', 'base' or 'adapter', got {tokenizer!r}.")
    started = time.perf_counter()
    output = Path(output).expanduser().absolute()
    base_dir = resolve_folder(base, "Base model")
    adapter_dir = resolve_folder(adapter, "Adapter")
    for what, path in (("base model", base_dir), ("adapter", adapter_dir)):
        resolved = output.resolve()
        if resolved == path or resolved in path.parents:
            raise ValueError(f"Output folder {output} is (or contains) the {what} folder {path}; choose another.")
    _clean_stale(output, say)
    if output.exists() and not force:
        raise OutputExistsError(f"Output folder {output} already exists; pass --force (force=True) to replace it.")

    # ---- validate everything before writing anything
    base_ckpt = scan_base_checkpoint(base_dir)
    adapter_ckpt = load_adapter(adapter_dir)
    plan = plan_merge(adapter_ckpt, base_ckpt)
    files, tokenizer_from = _support_files(base_dir, adapter_dir, tokenizer)
    needed = (
        base_ckpt.total_bytes
        + sum(p.stat().st_size for p in files.values())
        + (base_ckpt.index_file.stat().st_size if base_ckpt.index_file else 0)
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(output.parent).free
    if free < needed + (16 << 20):
        raise InsufficientSpaceError(
            errno.ENOSPC,
            f"Not enough free disk space in {output.parent}: the merged checkpoint needs {needed / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB are free. Nothing was written.",
        )
    say(
        f"[neuroada-merge] {adapter_ckpt.peft_type} adapter {adapter_dir} -> base {base_dir}: "
        f"{len(plan)} of {len(base_ckpt.tensors)} tensors change, {len(base_ckpt.shards)} shard(s), "
        f"{needed / 1e9:.2f} GB to write"
    )

    # ---- write into a staging folder, then rename
    staging = output.parent / f"{staging_prefix(output)}{os.getpid()}.{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        written = _write_shards(base_ckpt, plan, staging, progress)
        if base_ckpt.index_file is not None:
            shutil.copyfile(base_ckpt.index_file, staging / SAFE_INDEX)
        for name, source in files.items():
            shutil.copyfile(source, staging / name)
        _fsync_tree(staging)
        verification = None
        if verify:  # on the staging folder: a failed check leaves no output behind
            from .verify import verify_merge

            verification = verify_merge(base_dir, adapter_dir, staging, log=say)
        _install(staging, output, force, say)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        if error.errno == errno.ENOSPC:
            raise InsufficientSpaceError(
                errno.ENOSPC,
                f"Disk full while writing the merged checkpoint into {output.parent}; partial output removed.",
            ) from error
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    report = MergeReport(
        output=output,
        peft_type=adapter_ckpt.peft_type,
        shards=len(base_ckpt.shards),
        tensors=len(base_ckpt.tensors),
        patched_tensors=len(plan),
        patches=sum(len(p) for p in plan.values()),
        bytes_written=written,
        seconds=time.perf_counter() - started,
        tokenizer_from=tokenizer_from,
        verification=verification,
    )
    return report


def _write_shards(base: BaseCheckpoint, plan: Mapping[str, list[TensorPatch]], staging: Path, progress: bool) -> int:
    from tqdm.auto import tqdm

    written = 0
    bar = tqdm(total=base.total_bytes, unit="B", unit_scale=True, desc="neuroada-merge", disable=not progress)
    buffer = bytearray(_COPY_CHUNK)
    # Patches touch out*k entries per tensor: intra-op threads cost more than they save, and on
    # a busy machine every parallel region waits for descheduled threads (measured: 26.6 s -> 9.9 s
    # for a 1.3 GB checkpoint with top_k=20 on 2 shared cores). One thread for the merge only.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for shard in base.shards:
            with open(shard.path, "rb") as source, open(staging / shard.path.name, "wb") as target:
                _write_chunk(target, shard.raw)
                written += len(shard.raw)
                bar.update(len(shard.raw))
                for entry in shard.tensors:
                    patches = plan.get(entry.name)
                    if patches:
                        tensor = read_tensor(source, entry)
                        for patch in patches:
                            tensor = patch.apply(tensor)
                        if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.torch_dtype:
                            raise RuntimeError(
                                f"merge rule changed {entry.name!r} from {entry.dtype}{list(entry.shape)} to "
                                f"{tensor.dtype}{list(tensor.shape)}; patches must keep shape and dtype."
                            )
                        _write_chunk(target, tensor_bytes(tensor))
                        del tensor
                    else:
                        _copy_range(source, target, entry.begin, entry.nbytes, buffer)
                    written += entry.nbytes
                    bar.update(entry.nbytes)
                target.flush()
                os.fsync(target.fileno())
    finally:
        torch.set_num_threads(threads)
        bar.close()
    return written


def _copy_range(source, target, begin: int, count: int, buffer: bytearray) -> None:
    source.seek(begin)
    view = memoryview(buffer)
    while count > 0:
        got = source.readinto(view[: min(count, len(buffer))])
        if not got:
            raise CheckpointFileError(f"{source.name}: file ended early while copying (changed during the merge?).")
        _write_chunk(target, view[:got])
        count -= got


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _install(staging: Path, output: Path, force: bool, log: Log) -> None:
    """Rename the finished staging folder to ``output`` (moving an existing one aside first with ``force``)."""
    old = None
    if output.exists() or output.is_symlink():
        if not force:
            raise OutputExistsError(
                f"Output folder {output} appeared during the merge; not replacing it without --force."
            )
        old = output.parent / f".{output.name}.{_OLD_TAG}.{os.getpid()}.{secrets.token_hex(4)}"
        output.rename(old)
        log(f"[neuroada-merge] replacing existing {output}")
    staging.rename(output)
    _fsync_dir(output.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()

"""Streaming checkpoint merge: base checkpoint + adapter -> an ordinary Hugging Face checkpoint.

Why streaming: ``PeftModel.merge_and_unload()`` + ``save_pretrained`` needs the whole model in
memory (and often a second copy while saving). A sparse adapter changes a tiny fraction of a
few tensors, so the merge copies every untouched byte range of each safetensors shard verbatim
and decodes only the tensors an adapter patches. Peak memory is about the largest patched
tensor, not the model; output shards are byte-identical to the input except inside patched
tensors, so headers, shard names and the shard index are reused unchanged.

The steps live in their own modules: :mod:`.sources` (read and check the inputs), :mod:`.plan`
(which tensors change, validated before the first output byte), :mod:`.writer` (staging
folder, shard streaming, fsync, atomic rename). What an adapter does to a tensor comes from its
method's rule (:mod:`.rules`, found through :mod:`neuroada_plugin.registry`). Nothing here
imports PEFT or Transformers.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..registry import MethodSpec
from .errors import InsufficientSpaceError
from .plan import FingerprintChecks, plan_merge, vocabulary_resize
from .rules import TensorPatch, method_for_adapter
from .safetensors_io import DTYPES, read_tensor
from .sources import (
    MERGE_INFO,
    SAFE_INDEX,
    BaseCheckpoint,
    load_adapter,
    resolve_folder,
    scan_base_checkpoint,
    support_files,
)
from .writer import planned_shapes, prepare_output, staged_output, write_shards

__all__ = ["MergeReport", "merge_adapter_checkpoint"]

Log = Callable[[str], None]


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
    method: str = ""
    verification: dict[str, Any] | None = field(default=None)

    def summary(self) -> str:
        text = (
            f"merged {self.method or self.peft_type} adapter ({self.peft_type}) into {self.output}: "
            f"{self.patched_tensors}/{self.tensors} tensors changed in {self.shards} shard(s), "
            f"{self.bytes_written / 1e6:.1f} MB written in {self.seconds:.2f} s (tokenizer from {self.tokenizer_from})"
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
    allow_base_mismatch: bool = False,
    log: Log | None = print,
) -> MergeReport:
    """Merge the adapter in ``adapter`` into the base checkpoint ``base``; write an ordinary checkpoint to ``output``.

    Args:
        base: Base model folder with ``config.json`` and safetensors weights (one file or
            sharded with ``model.safetensors.index.json``), or a hub repo id.
        adapter: Adapter folder written by ``save_pretrained`` (PEFT, TRL, Axolotl), or a hub id.
        output: Folder to create. Written atomically (staging folder + rename). It also gets a
            ``merge_info.json`` recording the method, inputs and package version.
        force: Replace ``output`` if it exists (otherwise :class:`OutputExistsError`).
        progress: Show a tqdm progress bar (bytes written).
        tokenizer: ``"auto"`` (the adapter's tokenizer files if it has any, else the base's),
            ``"base"`` or ``"adapter"``.
        verify: Before the output is put in place, load it and compare it with the unmerged adapter
            (loads the whole model with PEFT; see :mod:`.verify`). A failed verification raises
            :class:`~.verify.VerificationError` and leaves no output.
        allow_base_mismatch: Merge even where the base weights' fingerprint differs from the one the adapter
            recorded when it was created (:mod:`neuroada_plugin.kit.fingerprint`); otherwise that is a
            :class:`~neuroada_plugin.kit.fingerprint.BaseMismatchError` and nothing is written.
        log: Callable for progress messages (``None``: silent).

    Returns:
        A :class:`MergeReport`.
    """
    say: Log = log or (lambda message: None)
    if tokenizer not in ("auto", "base", "adapter"):
        raise ValueError(f"tokenizer must be 'auto', 'base' or 'adapter', got {tokenizer!r}.")
    started = time.perf_counter()
    base_dir = resolve_folder(base, "Base model")
    adapter_dir = resolve_folder(adapter, "Adapter")
    output = prepare_output(output, {"base model": base_dir, "adapter": adapter_dir}, force, say)

    # ---- validate everything before writing anything
    base_ckpt = scan_base_checkpoint(base_dir)
    adapter_ckpt = load_adapter(adapter_dir)
    checks = FingerprintChecks(allow=allow_base_mismatch)
    plan = plan_merge(adapter_ckpt, base_ckpt, checks)
    _check_first_fingerprint(base_ckpt, checks, say)
    spec = method_for_adapter(adapter_ckpt.peft_type)
    files, tokenizer_from = support_files(base_dir, adapter_dir, tokenizer)
    needed = (
        base_ckpt.total_bytes
        + _size_change(base_ckpt, plan)
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
        f"[merge] {spec.name} adapter {adapter_dir} -> base {base_dir}: {len(plan)} of {len(base_ckpt.tensors)} "
        f"tensors change, {len(base_ckpt.shards)} shard(s), {needed / 1e9:.2f} GB to write"
    )

    vocab_size = vocabulary_resize(plan)
    if vocab_size is not None:
        say(f"[merge] the adapter resized the vocabulary: {_vocab_size(base_ckpt.config)} -> {vocab_size} tokens")
        if tokenizer_from != "adapter":
            say(
                f"[merge] warning: the adapter folder has no tokenizer files, so {output.name} gets the base's "
                f"tokenizer, which may not know the added tokens; copy the tokenizer the adapter was trained with "
                "into the adapter folder (TRL/Axolotl save it there) and merge again."
            )

    # ---- write into a staging folder, then rename
    with staged_output(output, force, say) as staging:
        written = _write(base_ckpt, plan, staging, progress)
        if base_ckpt.index_file is not None:
            _write_index(base_ckpt, plan, staging / SAFE_INDEX)
        for name, source in files.items():
            shutil.copyfile(source, staging / name)
        if vocab_size is not None:
            _write_vocab_size(staging / "config.json", vocab_size)
        _write_merge_info(
            staging / MERGE_INFO,
            method=spec.name,
            peft_type=spec.peft_type,
            base=base_dir,
            adapter=adapter_dir,
            adapter_config=adapter_ckpt.config,
            dtype=base_ckpt.main_dtype(),
            patched=len(plan),
            tokenizer_from=tokenizer_from,
            exact_merge=spec.exact_merge,
            base_fingerprint=checks.summary(),
            **_trained_against_facts(adapter_ckpt.config, plan, spec),
            vocab_size=vocab_size or _vocab_size(base_ckpt.config),
            base_vocab_size=_vocab_size(base_ckpt.config),
            **_quantization_facts(base_dir, adapter_dir),
        )
        verification = None
        if verify:  # on the staging folder: a failed check leaves no output behind
            from .verify import verify_merge

            verification = verify_merge(
                base_dir, adapter_dir, staging, allow_base_mismatch=allow_base_mismatch, log=say
            )

    return MergeReport(
        output=output,
        peft_type=adapter_ckpt.peft_type,
        method=spec.name,
        shards=len(base_ckpt.shards),
        tensors=len(base_ckpt.tensors),
        patched_tensors=len(plan),
        patches=sum(len(p) for p in plan.values()),
        bytes_written=written,
        seconds=time.perf_counter() - started,
        tokenizer_from=tokenizer_from,
        verification=verification,
    )


def _write(base_ckpt, plan, staging: Path, progress: bool) -> int:
    if not progress:
        return write_shards(base_ckpt, plan, staging)
    from tqdm.auto import tqdm

    with tqdm(total=base_ckpt.total_bytes, unit="B", unit_scale=True, desc="merge") as bar:
        return write_shards(base_ckpt, plan, staging, bar.update)


def _check_first_fingerprint(base_ckpt: BaseCheckpoint, checks: FingerprintChecks, say: Log) -> None:
    """Compare one layer's base fingerprint before writing anything (the rest are compared as the weights are
    read): an entirely wrong base fails in a second, not after a checkpoint's worth of writing."""
    if checks.not_recorded and not checks.patches:
        say(
            f"[merge] the adapter records no base fingerprint ({len(checks.not_recorded)} layers; saved before "
            "neuroada-plugin recorded them): the base weights cannot be checked against it"
        )
    if not checks.patches:
        return
    patch = checks.patches[0]
    entry = base_ckpt.entries[patch.target]
    with open(base_ckpt.tensors[patch.target].file, "rb") as handle:
        patch.apply(read_tensor(handle, entry))


def _size_change(base_ckpt: BaseCheckpoint, plan: dict[str, list[TensorPatch]]) -> int:
    """Bytes the plan adds to the tensor data (a resized vocabulary; 0 otherwise)."""
    change = 0
    for name, shape in planned_shapes(plan).items():
        entry = base_ckpt.entries[name]
        change += math.prod(shape) * DTYPES[entry.dtype][0] - entry.nbytes
    return change


def _write_index(base_ckpt: BaseCheckpoint, plan: dict[str, list[TensorPatch]], path: Path) -> None:
    """The shard index: the base's file as is, or with ``metadata.total_size`` updated for a resized vocabulary."""
    change = _size_change(base_ckpt, plan)
    if not change:
        shutil.copyfile(base_ckpt.index_file, path)
        return
    index = json.loads(base_ckpt.index_file.read_text(encoding="utf-8"))
    metadata = index.setdefault("metadata", {})
    if isinstance(metadata.get("total_size"), int):
        metadata["total_size"] += change
    path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _vocab_size(config: dict[str, Any]) -> int | None:
    """``vocab_size`` of a model config (top level, or a multimodal model's ``text_config``)."""
    for section in (config, config.get("text_config")):
        if isinstance(section, dict) and isinstance(section.get("vocab_size"), int):
            return section["vocab_size"]
    return None


def _write_vocab_size(path: Path, vocab_size: int) -> None:
    """Set the merged model's ``vocab_size`` (where the base config states one) to the adapter's."""
    config = json.loads(path.read_text(encoding="utf-8"))
    for section in (config, config.get("text_config")):
        if isinstance(section, dict) and "vocab_size" in section:
            section["vocab_size"] = vocab_size
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _quantization_facts(base_dir: Path, adapter_dir: Path) -> dict[str, Any]:
    """What ``merge_info.json`` says about quantization: the merged base's and the adapter's training base's.

    ``base_quantization``: the ``quantization_config`` of the base checkpoint merged into (``None``:
    full precision, the recommended target for an adapter trained on a 4-bit/8-bit base).
    ``adapter_training_quantization``: the bitsandbytes settings the adapter was trained with, when
    its folder records them (PEFT's model card section; ``None`` when not recorded: PEFT 0.21
    does not write it, nor do the adapter files need it: indices and theta do not depend on it).
    """
    base_quantization = None
    try:
        config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
        base_quantization = config.get("quantization_config")
    except (OSError, ValueError):
        pass
    trained_with: dict[str, str] | None = None
    try:
        lines = (adapter_dir / "README.md").read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    for number, line in enumerate(lines):
        if "quantization config was used during training" in line:
            trained_with = {}
            for item in lines[number + 1 :]:
                if not item.startswith("- ") or ": " not in item:
                    break
                key, _, value = item[2:].partition(": ")
                trained_with[key.strip()] = value.strip()
            break
    return {"base_quantization": base_quantization, "adapter_training_quantization": trained_with}


def _trained_against_facts(
    adapter_config: dict[str, Any], plan: dict[str, list[TensorPatch]], spec: MethodSpec
) -> dict[str, Any]:
    """What ``merge_info.json`` says about the weight a weight-function method's update was computed from.

    Nothing for NeuroAda-like methods (their update does not read the weight). For NEAT/SMoA-like ones:
    ``update_computed_from`` is ``"base"`` (this checkpoint's weight), or ``"re-quantized base"`` when the
    adapter was trained on a bitsandbytes base (``base_quantization`` recorded in its config): each such
    weight was quantized and dequantized again with the recorded settings, and
    ``patch_notes.reproduced_fingerprint_distance`` is the largest fingerprint distance between that and
    the weight the adapter recorded in training.
    """
    if not spec.reads_weights_in_forward:
        return {}
    notes: dict[str, float] = {}
    for patch in {id(p): p for patches in plan.values() for p in patches}.values():
        for key, value in patch.notes.items():
            notes[key] = round(max(value, notes.get(key, value)), 6)
    groups = adapter_config.get("base_quantization") or []
    return {
        "update_computed_from": "re-quantized base" if groups else "base",
        "adapter_base_quantization": groups or None,
        "patch_notes": notes,
    }


def _write_merge_info(path: Path, **facts: Any) -> None:
    """``merge_info.json``: what produced this folder (method, inputs, dtype, package version)."""
    from .. import __version__

    adapter_config = facts.pop("adapter_config")
    record = {
        "tool": "neuroada-plugin merge",
        "version": __version__,
        **{k: str(v) if isinstance(v, Path) else v for k, v in facts.items()},
        "base_model_name_or_path": adapter_config.get("base_model_name_or_path"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

"""Exact export of a NEAT adapter to a standard PEFT LoRA adapter (vLLM multi-LoRA, any LoRA runtime).

Once training is over, ``W0`` is frozen, so ``P = act(A @ W0)`` (``[r, in]``) is a constant and
NEAT's update ``dW = s * B @ P`` is exactly a LoRA update with ``lora_A = P``, ``lora_B = s * B``
and ``lora_alpha = r`` (LoRA scaling ``alpha / r = 1``). The export reads each adapted layer's
base weight once (one tensor at a time from the safetensors shards), writes
``adapter_model.safetensors`` + a LoRA ``adapter_config.json`` into a staging folder and renames
it into place: nothing is left behind on failure.

Imports torch and safetensors only (no PEFT, no Transformers), like the merge CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterCheckpointError
from ..kit.fingerprint import OVERRIDE_ENV, check_fingerprint, mismatch_allowed
from ..kit.quantized import recorded_quantization
from ..kit.quantized_write import reproduce_quantized
from ..merge.plan import group_by_module, split_fingerprint
from ..merge.safetensors_io import read_tensor
from ..merge.sources import (
    ADAPTER_CONFIG,
    PEFT_PREFIX,
    TOKENIZER_FILE,
    AdapterCheckpoint,
    load_adapter,
    resolve_folder,
    scan_base_checkpoint,
)
from ..merge.writer import prepare_output, staged_output
from .checkpoint import NeatModuleTensors, check_base_weight, read_neat_module
from .functional import weight_features

__all__ = [
    "LoraExportReport",
    "export_lora_checkpoint",
    "lora_config",
    "lora_factors",
    "model_to_lora",
    "neat_to_lora_tensors",
]

LORA_WEIGHTS = "adapter_model.safetensors"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Log = Callable[[str], None]


def lora_factors(weight: torch.Tensor, tensors: NeatModuleTensors) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_A, lora_B) = (act(A @ W0) [r, in], s * B [out, r])`` in float32, so ``lora_B @ lora_A == dW``.

    ``weight`` must be the layer's original (pre-merge) base weight ``W0``.
    """
    f32 = torch.float32
    with torch.no_grad():
        features = weight_features(
            weight.to(f32),
            tensors.a.to(f32),
            None if tensors.encoders is None else tensors.encoders.to(f32),
            None if tensors.decoders is None else tensors.decoders.to(f32),
            tensors.act,
        )
        return features.contiguous(), (tensors.b.to(f32) * tensors.scaling).contiguous()


def neat_to_lora_tensors(
    adapter: AdapterCheckpoint,
    base_weight: Callable[[str], torch.Tensor],
    dtype: torch.dtype | None = None,
    module_paths: Iterable[str] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The LoRA state dict (PEFT's saved key format) and ``adapter_config.json`` for a NEAT adapter.

    Args:
        adapter: The NEAT adapter (keys without ``base_model.model.``; see :func:`~..merge.sources.load_adapter`).
        base_weight: Module path -> its original base weight ``[out, in]`` (called once per adapted layer).
        dtype: dtype of the written factors; ``None``: the adapter's own ``neat_A`` dtype.
        module_paths: Paths of every linear-like module of the base model; with them the config names
            targets by leaf name (``q_proj``) where that selects exactly the adapted layers.

    Tensors other than NEAT's (``modules_to_save`` copies) are carried over unchanged.
    """
    if adapter.peft_type != "NEAT":
        raise AdapterCheckpointError(
            f"{adapter.path / ADAPTER_CONFIG}: peft_type is {adapter.peft_type or 'missing'!r}, not 'NEAT'; "
            "only NEAT adapters export to LoRA (merge other adapters with `neuroada-plugin merge`)."
        )
    modules = group_by_module(adapter, "neat_")
    if not modules:
        raise AdapterCheckpointError(
            f"{adapter.weights_file}: adapter_config.json says NEAT, but the file has no neat_* tensors."
        )
    used = {key for module in modules.values() for key in module.keys.values()}
    lora: dict[str, torch.Tensor] = {}
    ranks = set()
    for path, module in modules.items():
        tensors = read_neat_module(split_fingerprint(module)[0])
        lora_a, lora_b = lora_factors(base_weight(path), tensors)
        out_dtype = dtype or tensors.a.dtype
        lora[f"{PEFT_PREFIX}{path}.lora_A.weight"] = lora_a.to(out_dtype)
        lora[f"{PEFT_PREFIX}{path}.lora_B.weight"] = lora_b.to(out_dtype)
        ranks.add(tensors.rank)
    for key, value in adapter.tensors.items():
        if key not in used:
            lora[f"{PEFT_PREFIX}{key}"] = value
    if len(ranks) != 1:  # NeatConfig has one r; a hand-edited file could differ
        raise AdapterCheckpointError(f"{adapter.weights_file}: NEAT layers have different ranks {sorted(ranks)}.")
    return lora, lora_config(adapter.config, sorted(modules), ranks.pop(), module_paths)


def lora_config(
    neat_config: Mapping[str, Any], adapted: list[str], rank: int, module_paths: Iterable[str] | None = None
) -> dict[str, Any]:
    """A PEFT ``LoraConfig`` (as JSON) whose update equals the NEAT adapter's: ``lora_alpha = r`` (scale 1).

    ``target_modules`` are the adapted layers' leaf names (``q_proj``) when, among ``module_paths``,
    those names select exactly the adapted layers; otherwise the full module paths, so PEFT never
    adds LoRA layers the export has no tensors for.
    """
    leaves = sorted({path.rsplit(".", 1)[-1] for path in adapted})
    known = set(module_paths or ())
    by_leaf = {path for path in known if path.rsplit(".", 1)[-1] in leaves}
    targets = leaves if known and by_leaf == set(adapted) else list(adapted)
    return {
        "peft_type": "LORA",
        "task_type": neat_config.get("task_type"),
        "base_model_name_or_path": neat_config.get("base_model_name_or_path"),
        "revision": neat_config.get("revision"),
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": _as_list(neat_config.get("modules_to_save")),
        "inference_mode": True,
    }


def _as_list(value: Any) -> list[str] | None:
    if value is None:
        return None
    return sorted(value) if isinstance(value, (set, list, tuple)) else [value]


@dataclass
class LoraExportReport:
    """What :func:`export_lora_checkpoint` wrote."""

    output: Path
    layers: int
    rank: int
    dtype: str
    bytes_written: int
    seconds: float

    def summary(self) -> str:
        return (
            f"Wrote LoRA adapter {self.output}: {self.layers} layers, r={self.rank}, lora_alpha={self.rank}, "
            f"{self.dtype}, {self.bytes_written / 1e6:.2f} MB in {self.seconds:.2f} s"
        )


def export_lora_checkpoint(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dtype: str | None = None,
    force: bool = False,
    progress: bool = True,
    log: Log | None = print,
) -> LoraExportReport:
    """Write the LoRA adapter equal to the NEAT adapter ``adapter`` of base model ``base`` into ``output``.

    Args:
        base: The base model folder (or hub id) the adapter was trained on: its safetensors
            weights are needed because ``lora_A = act(A @ W0)`` reads ``W0``. Only the adapted
            layers' weights are read, one at a time.
        adapter: A saved NEAT adapter folder (PEFT, TRL or Axolotl output).
        output: Folder to create; written atomically (staging folder + rename).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` for the LoRA factors; ``None``: the
            adapter's dtype (float32 for a default NEAT adapter: exact).
        force: Replace ``output`` if it exists.
        progress: Show a progress bar over the layers.
        log: Callable for messages (``None``: silent).
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    say: Log = log or (lambda message: None)
    started = time.perf_counter()
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} (or None for the adapter's), got {dtype!r}.")
    base_dir = resolve_folder(base, "Base model")
    adapter_dir = resolve_folder(adapter, "Adapter")
    output = prepare_output(output, {"base model": base_dir, "adapter": adapter_dir}, force, say)

    base_ckpt = scan_base_checkpoint(base_dir)
    neat = load_adapter(adapter_dir)
    modules = group_by_module(neat, "neat_")
    bar = tqdm(total=len(modules), desc="neat->lora", unit="layer", disable=not progress)

    def base_weight(path: str) -> torch.Tensor:
        name = f"{path}.weight"
        info = base_ckpt.tensors.get(name)
        if info is None:
            raise AdapterCheckpointError(
                f"Adapter and base model do not match: NEAT layer {path} needs base tensor {name!r}, which base "
                f"checkpoint {base_dir} does not contain (was the adapter trained on another model?)."
            )
        module, recorded, _ = split_fingerprint(modules[path])
        check_base_weight(module, read_neat_module(module), info)
        with open(info.file, "rb") as handle:
            weight = read_tensor(handle, base_ckpt.entries[name])
        check_fingerprint(
            recorded, weight, where=module.where, allow=mismatch_allowed(), override=f"set {OVERRIDE_ENV}=1"
        )
        bar.update(1)
        # Trained on a bitsandbytes base: P is a function of the original quantized again, as in the merge.
        settings = recorded_quantization(neat.config, path)
        return weight if settings is None else reproduce_quantized(weight, settings)

    paths = [
        name.removesuffix(".weight")
        for name, info in base_ckpt.tensors.items()
        if name.endswith(".weight") and len(info.shape) == 2
    ]
    try:
        tensors, config = neat_to_lora_tensors(neat, base_weight, _DTYPES.get(dtype or ""), paths)
    finally:
        bar.close()
    with staged_output(output, force, say) as staging:
        save_file(tensors, str(staging / LORA_WEIGHTS), metadata={"format": "pt"})
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for source in adapter_dir.iterdir():
            if source.is_file() and TOKENIZER_FILE.fullmatch(source.name):
                shutil.copyfile(source, staging / source.name)
    written = sum(p.stat().st_size for p in output.iterdir() if p.is_file())
    first = next(iter(tensors.values()))
    return LoraExportReport(
        output=output,
        layers=len(modules),
        rank=config["r"],
        dtype=str(first.dtype).removeprefix("torch."),
        bytes_written=written,
        seconds=time.perf_counter() - started,
    )


def model_to_lora(model: Any, adapter_name: str = "default") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The LoRA state dict and config equal to adapter ``adapter_name`` of a live NEAT ``PeftModel``.

    Works on a merged model too (each layer keeps its pre-merge weight). Save the result with
    ``safetensors.torch.save_file(tensors, dir / "adapter_model.safetensors")`` and the config as
    ``adapter_config.json``, or load it into a LoRA ``PeftModel`` directly.
    """
    from peft.utils import get_peft_model_state_dict

    from .layer import NeatLayer

    config = {**model.peft_config[adapter_name].to_dict(), "peft_type": "NEAT"}
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    tensors = {key.removeprefix(PEFT_PREFIX): value.detach() for key, value in state.items()}
    root = model.get_base_model()
    layers = {name: module for name, module in root.named_modules() if isinstance(module, NeatLayer)}

    def base_weight(path: str) -> torch.Tensor:
        # The weight before any merge as the adapter's update reads it (dequantized on a 4-bit/8-bit base, or
        # the original quantized again for an adapter trained on one).
        with layers[path].read_pre_merge_weight() as weight:
            return layers[path].trained_against(weight.detach(), adapter_name)

    adapter = AdapterCheckpoint(
        path=Path("<in memory>"), config=config, tensors=tensors, weights_file=Path("<in memory>")
    )
    paths = [
        name
        for name, module in root.named_modules()
        if isinstance(module, (torch.nn.Linear, NeatLayer)) and not name.endswith(".base_layer")
    ]
    return neat_to_lora_tensors(adapter, base_weight, module_paths=paths)

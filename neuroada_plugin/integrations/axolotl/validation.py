"""Checks of an Axolotl config for this package's adapters, run while the YAML is validated.

Everything that can be checked without a model is checked here, so a run never fails after
minutes of data preparation. What a method accepts comes from its spec's capability flags,
not from one method's policies:

* ``needs_float_weights``: quantized loading (``load_in_4bit`` ...) is refused;
* ``reads_weights_when_created`` without ``supports_sharding``: configurations that hand the
  method partitioned or meta weights when the adapter is created (DeepSpeed ZeRO-3, FSDP
  ``cpu_ram_efficient_loading``) are refused; with it they pass (ZeRO-3 still needs
  ``stage3_gather_16bit_weights_on_model_save: true``, or the saved adapter would be empty);
* ``reads_weights_in_forward`` without ``supports_sharding``: DeepSpeed ZeRO-3 is refused (the
  layer would see a partition of the weight in its forward);
* every method: misspelt keys (a wrong ``<method>_*`` field, a misspelt prefix such as
  ``neuroda_top_k``, a bare field such as ``top_k`` under ``adapter: neuroada``), LoRA-only keys
  that would be ignored (naming the method's equivalent), merge methods that only understand
  LoRA files, RL continuations that would drop the adapter, RL types that cannot train an
  adapter (``rl: gdpo``, see :data:`UNTRAINABLE_RL`), and vLLM weight syncs that send LoRA weights
  only (:data:`LORA_ONLY_WEIGHT_SYNC`).

Axolotl drops undeclared keys silently, so a misspelt key would train with a default instead.
Only keys that Axolotl's own schema does not declare are ever called misspelt: its key set comes
from the config model being validated (Axolotl's schema merged with every plugin's) or, for a
direct call, from ``axolotl.utils.schemas.config``, imported on first use.

Read against axolotl 0.19.0.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from pydantic import AliasChoices, BaseModel, model_validator

from ...registry import MethodSpec, methods
from .args import MethodArgsBase, exposed_fields, yaml_key

__all__ = [
    "ValidatedMethodArgs",
    "axolotl_config_keys",
    "check_raw_config",
    "edit_distance",
    "lora_equivalent",
    "model_keys",
    "peft_config_from_cfg",
    "prefixed_misspelling_distance",
    "suggest_method_key",
]

# RL types for which axolotl asks the adapter loader for the config only and lets TRL wrap
# the policy (axolotl/loaders/model.py `_load_adapters`).
CONFIG_ONLY_RL = ("dpo", "ipo", "kto")

# RL types that fail with any adapter in axolotl 0.19, LoRA included, -> why, and what to write instead.
# `rl: gdpo`: axolotl wraps the model with the adapter before building the trainer (gdpo is not in
# `_load_adapters`' config-only list) and also passes `peft_config` to TRL's GRPOTrainer (gdpo is not in
# the exclusions of `HFRLTrainerBuilder.build`), which TRL refuses. Everything else axolotl does for
# gdpo is `rl: grpo` plus `multi_objective_aggregation` defaulting to `normalize_then_sum`.
UNTRAINABLE_RL: dict[str, str] = {
    "gdpo": (
        "axolotl 0.19 wraps the model with the adapter itself and then also hands TRL the adapter config, which "
        "TRL's GRPOTrainer refuses (\"You passed a `PeftModel` instance together with a `peft_config` to the "
        'trainer"); LoRA fails the same way. GDPO is GRPO with each reward normalised before the sum, and '
        "that is all `rl: gdpo` changes: write `rl: grpo` with `trl: {multi_objective_aggregation: "
        "normalize_then_sum}` instead (see axolotl_configs/ci/tiny_grpo.yml)."
    ),
}

# LoRA-specific keys that shape what a LoRA adapter trains. With another adapter they would
# be ignored silently; they are rejected instead. Values: the PEFT config field(s) the key sets
# (LoraConfig's vocabulary, first match wins) and, where the YAML value does not carry over, the
# value to write instead. A method whose config has such a field gets it named as the
# replacement (`lora_r` -> `neat_r`), so no method is named here.
_LORA_KEYS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "lora_r": (("r",), None),
    "lora_alpha": (("lora_alpha", "alpha"), None),
    "lora_dropout": (("lora_dropout", "dropout"), None),
    "lora_target_modules": (("target_modules",), None),
    "lora_target_linear": (("target_modules",), "all-linear"),
    "lora_target_parameters": (("target_parameters",), None),
    "lora_fan_in_fan_out": (("fan_in_fan_out",), None),
    "lora_rank_pattern": (("rank_pattern",), None),
    "lora_alpha_pattern": (("alpha_pattern",), None),
    "peft_layers_to_transform": (("layers_to_transform",), None),
    "peft_layers_pattern": (("layers_pattern",), None),
    "peft_use_dora": (("use_dora",), None),
    "peft_use_rslora": (("use_rslora",), None),
    "peft_init_lora_weights": (("init_lora_weights", "init_weights"), None),
    "loraplus_lr_ratio": ((), None),
}
_QUANTIZATION_KEYS = ("load_in_8bit", "load_in_4bit", "gptq", "quantize_moe_experts")
# Quantized loading a method may accept: YAML key -> the layer kind its spec lists in quantized_layers.
QUANTIZED_LOADING = {"load_in_4bit": "bnb_4bit", "load_in_8bit": "bnb_8bit"}


def declared_keys(spec: MethodSpec) -> list[str]:
    """The YAML keys ``spec`` understands."""
    return sorted(yaml_key(spec, f.name) for f in exposed_fields(spec))


def cfg_get(cfg: Any, key: str) -> Any:
    """``cfg[key]`` for a dict, ``DictDefault`` or args model (``None`` when absent)."""
    if isinstance(cfg, Mapping):
        return cfg.get(key)
    return getattr(cfg, key, None)


def _present(data: Mapping[str, Any], key: str) -> bool:
    return key in data and data[key] is not None


# ------------------------------------------------------------------------------------------ key spelling


@functools.lru_cache(maxsize=16)
def model_keys(model: type[BaseModel]) -> frozenset[str]:
    """The top-level keys a pydantic model accepts: field names and their aliases (``model_config``)."""
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        keys.add(name)
        for alias in (field.alias, field.validation_alias):
            if isinstance(alias, str):
                keys.add(alias)
            elif isinstance(alias, AliasChoices):
                keys.update(choice for choice in alias.choices if isinstance(choice, str))
    return frozenset(keys)


@functools.lru_cache(maxsize=1)
def axolotl_config_keys() -> frozenset[str]:
    """Every top-level key of Axolotl's own config schema (empty if this Axolotl keeps it elsewhere).

    Imported on first use: Axolotl builds its schema before importing plugins, so inside
    validation it is already loaded, and importing it from this module's top could be circular.
    """
    try:
        from axolotl.utils.schemas.config import AxolotlConfigWCapabilities
    except ImportError:  # pragma: no cover - another Axolotl layout; the validated class still knows its keys
        return frozenset()
    return model_keys(AxolotlConfigWCapabilities)


def _knows_axolotl_keys(known: Collection[str]) -> bool:
    """Whether ``known`` holds Axolotl's schema (``base_model``, a key it requires, stands for it).

    Without it, a bare field name could be one of Axolotl's keys (``seed`` is NeuroAda's field and
    Axolotl's key), so bare names are not refused.
    """
    return "base_model" in known


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance counting a swap of neighbours as one edit (``nueroada`` is 1 from ``neuroada``)."""
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            cost = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b))
            if i > 1 and j > 1 and char_a == b[j - 2] and a[i - 2] == char_b:
                cost = min(cost, previous2[j - 2] + 1)
            current.append(cost)
        previous2, previous = previous, current
    return previous[-1]


def _folded(key: str) -> str:
    """Case and dashes folded: ``NeuroAda-top-k`` is read as ``neuroada_top_k``."""
    return key.lower().replace("-", "_")


def _misspelling_distance(key: str, spec: MethodSpec, field_name: str) -> int | None:
    """How far ``key`` is from ``spec``'s key for ``field_name``, when it reads as a misspelling of it.

    Either the whole key is within one edit per six characters (at least one) of the method key, or
    it is the field spelt right after a prefix within one edit per three characters of the method's
    prefix (``neuro_top_k``, ``nat_r``). Far-off keys return ``None``: they may be another tool's.
    """
    return prefixed_misspelling_distance(key, spec.yaml_prefix, field_name)


def prefixed_misspelling_distance(key: str, prefix: str, field_name: str) -> int | None:
    """:func:`_misspelling_distance` for any ``<prefix><field>`` key (method keys, SAFE's ``safe_*`` keys)."""
    folded, target = _folded(key), f"{prefix}{field_name}"
    distance = edit_distance(folded, target)
    if distance <= max(1, len(target) // 6):
        return distance
    suffix = f"_{field_name}"
    if folded.endswith(suffix) and len(folded) > len(suffix):
        head = folded[: -len(field_name)]
        head_distance = edit_distance(head, prefix)
        if head_distance <= max(1, len(prefix) // 3):
            return head_distance
    return None


def suggest_method_key(key: str, specs: Iterable[MethodSpec] | None = None) -> tuple[MethodSpec, str] | None:
    """The method and YAML key that ``key`` misspells (``neuroda_top_k`` -> ``neuroada_top_k``), or ``None``.

    Compared against every registered method's keys (``specs`` defaults to the registry), the
    nearest wins.
    """
    best: tuple[int, MethodSpec, str] | None = None
    for spec in methods().values() if specs is None else specs:
        for field in exposed_fields(spec):
            distance = _misspelling_distance(key, spec, field.name)
            if distance is not None and (best is None or distance < best[0]):
                best = (distance, spec, yaml_key(spec, field.name))
    return None if best is None else (best[1], best[2])


def _bare_field(key: str, spec: MethodSpec) -> str | None:
    """``spec``'s YAML key when ``key`` is one of its field names written without the prefix (``top_k``).

    Fields of five or more letters also match at one edit (``topk``); shorter ones (``r``) only exactly.
    """
    folded = _folded(key)
    for field in exposed_fields(spec):
        if folded == field.name or (len(field.name) >= 5 and edit_distance(folded, field.name) <= 1):
            return yaml_key(spec, field.name)
    return None


def _yaml_value(value: Any) -> str:
    """``value`` as it would be written in the YAML (JSON is valid YAML); elided when long."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else "..."


def _check_spelling(spec: MethodSpec, data: Mapping[str, Any], known: Collection[str]) -> None:
    """Refuse keys Axolotl would drop silently that read as one of a method's keys.

    Three kinds: a wrong field after ``spec``'s own prefix (``neuroada_topk``: every such key is
    refused), a misspelt prefix of any registered method (``neuroda_top_k``), and, when ``adapter:``
    is ``spec``, a field name without its prefix (``top_k``). Keys Axolotl declares are never refused.
    """
    prefix, name, declared = spec.yaml_prefix, spec.name, declared_keys(spec)
    specs = list(methods().values())
    if spec.name not in {s.name for s in specs}:
        specs.append(spec)  # a spec checked directly without being registered
    method_keys = {k for s in specs for k in declared_keys(s)}
    prefixes = tuple(s.yaml_prefix for s in specs)
    candidates = [k for k in data if isinstance(k, str) and k not in known and k not in method_keys]

    own = sorted(k for k in candidates if k.startswith(prefix))
    if own:
        hints = []
        for key in own:
            close = difflib.get_close_matches(key, declared, n=1)
            hints.append(f"`{key}`" + (f" (did you mean `{close[0]}`?)" if close else ""))
        raise ValueError(
            f"Unknown {prefix}* key(s): {', '.join(hints)}. Keys understood by adapter: {name}: {', '.join(declared)}."
        )

    hints, owners = [], []
    bare_allowed = data.get("adapter") == name and _knows_axolotl_keys(known)
    for key in candidates:
        if key.startswith(prefixes) or data[key] is None:  # a prefixed key is its own method's to report
            continue
        suggestion = suggest_method_key(key, specs)
        if suggestion is not None:
            owner, target = suggestion
            hints.append(
                f"`{key}` is not a key of Axolotl or of any adapter, and Axolotl would ignore it silently: "
                f"did you mean `{target}`? Write `{target}: {_yaml_value(data[key])}` instead."
            )
        elif bare_allowed and (target := _bare_field(key, spec)) is not None:
            owner = spec
            hints.append(
                f"`{key}` is not an Axolotl key, and Axolotl would ignore it silently: `adapter: {name}` settings "
                f"take the prefix `{prefix}`; did you mean `{target}`? Write `{target}: {_yaml_value(data[key])}` "
                "instead."
            )
        else:
            continue
        if owner not in owners:
            owners.append(owner)
    if hints:
        listed = " ".join(f"Keys understood by adapter: {s.name}: {', '.join(declared_keys(s))}." for s in owners)
        raise ValueError(f"{' '.join(hints)} {listed}")


# ------------------------------------------------------------------------------------------ the checks


def check_raw_config(
    spec: MethodSpec, data: Mapping[str, Any], known_keys: Collection[str] | None = None
) -> Mapping[str, Any]:
    """Reject what would be ignored or fail late; returns ``data`` (a copy when a default is filled in).

    ``known_keys``: the keys the Axolotl config being validated declares (its own and every plugin's);
    default: Axolotl's own schema. A key in it is never called misspelt.
    """
    name, declared = spec.name, declared_keys(spec)
    _check_spelling(spec, data, axolotl_config_keys() if known_keys is None else known_keys)
    used = [k for k in declared if _present(data, k)]
    adapter = data.get("adapter")
    if adapter != name:
        if used:
            raise ValueError(
                f"{', '.join(used)} set, but `adapter:` is {adapter!r}. These keys configure `adapter: {name}`; "
                f"set `adapter: {name}` or remove them."
            )
        return data
    _check_base_model_loading(spec, data)
    _check_lora_keys(spec, declared, data)
    data = _check_merge_method(spec, data)
    _check_rl(spec, data)
    return data


def _check_base_model_loading(spec: MethodSpec, data: Mapping[str, Any]) -> None:
    name = spec.name
    quantized = [k for k in _QUANTIZATION_KEYS if data.get(k)]
    refused = [k for k in quantized if QUANTIZED_LOADING.get(k) not in spec.quantized_layers]
    if refused and spec.needs_float_weights:
        supported = [k for k, kind in QUANTIZED_LOADING.items() if kind in spec.quantized_layers]
        offer = (
            f"Supported quantized loading for `adapter: {name}`: {', '.join(f'{k}: true' for k in supported)} "
            "(bitsandbytes). "
            if supported
            else ""
        )
        raise ValueError(
            f"`adapter: {name}` cannot train on this quantized base model ({', '.join(f'{k}: true' for k in refused)}): "
            f"it reads and merges into individual entries of the weight. {offer}Otherwise remove "
            f"{', '.join(refused)} and load the model in bf16/fp16/fp32."
        )
    _check_sharding(spec, data)


def _check_sharding(spec: MethodSpec, data: Mapping[str, Any]) -> None:
    """ZeRO-2/3 and FSDP (incl. ``cpu_ram_efficient_loading``) pass for a method that ``supports_sharding``.

    Refused: a method that reads weights when created without gathering them (``supports_sharding``
    false) under ZeRO-3 or RAM-efficient loading, and ZeRO-3 without
    ``stage3_gather_16bit_weights_on_model_save: true`` (the Trainer would then save an empty adapter
    next to a DeepSpeed checkpoint, for every PEFT method), and FSDP1 with a quantized base (it flattens
    a unit's parameters into one dtype: torch refuses 4-bit storage beside float32 adapter parameters;
    FSDP2 and ZeRO-3 train on a 4-bit base, tests/test_distributed_qlora.py) or with RAM-efficient loading.
    """
    name = spec.name
    zero_stage = deepspeed_zero_stage(data.get("deepspeed"))
    fsdp_config = data.get("fsdp_config")
    ram_efficient = isinstance(fsdp_config, Mapping) and bool(fsdp_config.get("cpu_ram_efficient_loading"))
    if spec.reads_weights_when_created and not spec.supports_sharding:
        if zero_stage == 3:
            raise ValueError(
                f"DeepSpeed ZeRO-3 (`deepspeed: {data.get('deepspeed')}`) partitions the weights while the model "
                f"loads, but `adapter: {name}` reads the full weights when the adapter is created and cannot gather "
                "them. Use ZeRO-1/2, DDP, or FSDP."
            )
        if ram_efficient:
            raise ValueError(
                "`fsdp_config.cpu_ram_efficient_loading: true` loads the weights on non-zero ranks as meta tensors, "
                f"but `adapter: {name}` reads the weights when the adapter is created. Set it to false."
            )
    quantized = [k for k in QUANTIZED_LOADING if data.get(k)]
    if quantized and _fsdp_enabled(data) and str(_fsdp_version(data)) != "2":
        raise ValueError(
            f"FSDP1 (`fsdp_version: {_fsdp_version(data)}`) with a quantized base ({', '.join(f'{k}: true' for k in quantized)}) "
            "cannot wrap the model: FSDP1 flattens each unit's parameters into one tensor of one dtype, and the "
            "quantized weights (4-bit packed in bfloat16 storage, 8-bit as int8) sit beside the floating-point "
            f"`adapter: {name}` parameters and norms. "
            "Set `fsdp_version: 2` (FSDP2 shards each parameter on its own; Axolotl's FSDP-QLoRA patches are "
            "FSDP2-only too), or use DeepSpeed ZeRO-3, which trains on a 4-bit base as well."
        )
    if data.get("load_in_8bit") and _fsdp_enabled(data):
        raise ValueError(
            f"FSDP2 with an 8-bit base (`load_in_8bit: true`) is not supported for `adapter: {name}`: sharding "
            "bitsandbytes' Int8Params drops the int8 statistics its layer needs ('Parameter' object has no "
            "attribute 'CB' on the first forward, tests/test_distributed_qlora.py). Use `load_in_4bit: true` "
            "with `fsdp_version: 2`, or DeepSpeed ZeRO-3, which trains on an 8-bit base."
        )
    if quantized and ram_efficient:
        raise ValueError(
            f"`fsdp_config.cpu_ram_efficient_loading: true` with a quantized base ({', '.join(f'{k}: true' for k in quantized)}) "
            f"is not supported for `adapter: {name}`: Axolotl's sharded quantized loading is written for `adapter: "
            "qlora` only, and meta-device quantized layers on the other ranks are untested here. Set it to false: "
            "each rank then loads the quantized model (a quarter of its bf16 size for 4-bit) and FSDP2 shards it."
        )
    if spec.reads_weights_in_forward and not spec.supports_sharding and zero_stage == 3:
        raise ValueError(
            f"DeepSpeed ZeRO-3 (`deepspeed: {data.get('deepspeed')}`) partitions every weight outside its own "
            f"layer's matmul, but `adapter: {name}` reads the full frozen weight in every forward pass. Use "
            "ZeRO-1/2, DDP, or FSDP (which keeps a wrapped layer's weights whole through its forward and backward)."
        )
    if zero_stage == 3 and _zero3_gathers_on_save(data.get("deepspeed")) is False:
        raise ValueError(
            f"DeepSpeed ZeRO-3 (`deepspeed: {data.get('deepspeed')}`) without "
            "`zero_optimization.stage3_gather_16bit_weights_on_model_save: true`: the trainer would save an empty "
            f"`adapter: {name}` file (each rank holds only a partition of theta) and a DeepSpeed checkpoint instead. "
            "Set it to true in the DeepSpeed JSON (axolotl_configs/deepspeed/zero3.json does)."
        )


def _fsdp_enabled(data: Mapping[str, Any]) -> bool:
    return bool(data.get("fsdp_config") or data.get("fsdp"))


def _fsdp_version(data: Mapping[str, Any]) -> Any:
    """Axolotl's rule: top-level ``fsdp_version``, else ``fsdp_config.fsdp_version``, else 1."""
    version = data.get("fsdp_version")
    fsdp_config = data.get("fsdp_config")
    if version is None and isinstance(fsdp_config, Mapping):
        version = fsdp_config.get("fsdp_version")
    return 1 if version is None else version


def _deepspeed_config(deepspeed: Any) -> Mapping[str, Any] | None:
    config = deepspeed
    if isinstance(deepspeed, (str, os.PathLike)) and os.path.isfile(deepspeed):
        try:
            with open(deepspeed, encoding="utf-8") as handle:
                config = json.load(handle)
        except (OSError, ValueError):
            return None
    return config if isinstance(config, Mapping) else None


def _zero3_gathers_on_save(deepspeed: Any) -> bool | None:
    """``stage3_gather_16bit_weights_on_model_save`` of a readable DeepSpeed config (``None``: unknown)."""
    config = _deepspeed_config(deepspeed)
    if config is None:
        return None
    value = (config.get("zero_optimization") or {}).get("stage3_gather_16bit_weights_on_model_save", False)
    if value == "auto":  # accelerate fills "auto" in from its own default (true for ZeRO-3 model saving)
        return None
    return bool(value)


def lora_equivalent(spec: MethodSpec, lora_key: str) -> str | None:
    """``spec``'s YAML key doing what LoRA key ``lora_key`` does (``lora_r`` -> ``neat_r``), or ``None``.

    Found from the method's config fields, so a new method gets its equivalents without edits here;
    a fixed value to write is appended (``lora_target_linear`` -> ``neat_target_modules: all-linear``).
    """
    fields, value = _LORA_KEYS.get(lora_key, ((), None))
    exposed = {f.name for f in exposed_fields(spec)}
    field_name = next((f for f in fields if f in exposed), None)
    if field_name is None:
        return None
    return yaml_key(spec, field_name) + (f": {value}" if value is not None else "")


def _sets_something(key: str, value: Any) -> bool:
    """Whether a LoRA key's value would change a LoRA adapter (``false``, and a zero dropout, do not)."""
    if value is None or value is False:
        return False
    return not (key == "lora_dropout" and not value)


def _check_lora_keys(spec: MethodSpec, declared: list[str], data: Mapping[str, Any]) -> None:
    lora_keys = [k for k in _LORA_KEYS if k in data and _sets_something(k, data[k])]
    if lora_keys:
        hints = []
        for key in lora_keys:
            target = lora_equivalent(spec, key)
            hints.append(f"`{key}`" + (f" (use `{target}`)" if target else f" (no {spec.name} equivalent)"))
        raise ValueError(
            f"LoRA-only setting(s) {', '.join(hints)} have no effect with `adapter: {spec.name}`. Remove them, "
            f"writing the equivalent named in brackets where there is one; the {spec.name} settings are "
            f"{', '.join(declared)}."
        )
    modules_key = yaml_key(spec, "modules_to_save")
    if (
        _present(data, "lora_modules_to_save")
        and _present(data, modules_key)
        and list(data["lora_modules_to_save"]) != list(data[modules_key])
    ):
        raise ValueError(
            f"Both `lora_modules_to_save` {list(data['lora_modules_to_save'])} and `{modules_key}` "
            f"{list(data[modules_key])} are set and differ. Keep one (axolotl's added-token checks read "
            "`lora_modules_to_save`, which the adapter also honours)."
        )


def _check_merge_method(spec: MethodSpec, data: Mapping[str, Any]) -> Mapping[str, Any]:
    """``axolotl merge-lora``'s default merger reads LoRA files only; the legacy one loads the adapter."""
    merge_method = data.get("merge_method")
    if merge_method not in (None, "legacy"):
        raise ValueError(
            f"`merge_method: {merge_method}` only merges LoRA/DoRA files; `adapter: {spec.name}` is merged by "
            "loading the adapter and calling merge_and_unload. Remove `merge_method` (it defaults to `legacy` for "
            "this adapter) or set `merge_method: legacy`."
        )
    return {**data, "merge_method": "legacy"} if merge_method is None else data  # never mutate the caller's dict


# axolotl 0.19's trainers that generate with a vLLM server (GRPO, GDPO, EBFT). In their async variant
# (`trl.async_prefetch` / `trl.use_data_producer`) and with `trl.vllm_lora_sync` they send the server
# LoRA weights only: `_sync_peft_weights_no_merge` merges the modules that have `lora_A`/`lora_B` and
# skips every other one, `_sync_lora_adapter` asks vLLM to load the adapter folder as a LoRA adapter.
# Another adapter would train against a server that never sees its updates.
VLLM_GENERATING_RL = ("grpo", "gdpo", "ebft")
LORA_ONLY_WEIGHT_SYNC = ("async_prefetch", "use_data_producer", "vllm_lora_sync")


def _trl_setting(data: Mapping[str, Any], key: str) -> Any:
    trl = data.get("trl") or {}
    return trl.get(key) if isinstance(trl, Mapping) else getattr(trl, key, None)


def _check_rl(spec: MethodSpec, data: Mapping[str, Any]) -> None:
    rl = data.get("rl")
    rl_type = str(getattr(rl, "value", rl) or "").lower()  # a string from YAML, or axolotl's RLType
    if rl_type in UNTRAINABLE_RL:
        raise ValueError(f"`rl: {rl_type}` cannot train a {spec.name} adapter: {UNTRAINABLE_RL[rl_type]}")
    lora_only_sync = [key for key in LORA_ONLY_WEIGHT_SYNC if _trl_setting(data, key)]
    if rl_type in VLLM_GENERATING_RL and _trl_setting(data, "use_vllm") and lora_only_sync:
        raise ValueError(
            f"`rl: {rl_type}` with `trl.use_vllm: true` and {', '.join(f'`trl.{k}: true`' for k in lora_only_sync)} "
            f"would train the {spec.name} adapter against a vLLM server that never receives it: axolotl's async "
            "GRPO trainer sends the server LoRA weights only (it merges modules that have lora_A/lora_B and skips "
            "the others; `vllm_lora_sync` loads the adapter into vLLM as a LoRA adapter). Remove "
            f"{', '.join(f'`trl.{k}`' for k in lora_only_sync)}: the synchronous trainer syncs through "
            f"`merge_adapter()`, which merges {spec.name} exactly, or set `trl.use_vllm: false`."
        )
    if rl_type in CONFIG_ONLY_RL and _present(data, "lora_model_dir") and not data.get("merge_lora"):
        raise ValueError(
            f"`rl: {data.get('rl')}` with `lora_model_dir` would restart the {spec.name} adapter from zero: for "
            "this RL type axolotl lets TRL create the adapter from its config, never loading saved values. "
            "Merge the adapter first (`axolotl merge-lora <config>`) and use `<output_dir>/merged` as "
            "`base_model`."
        )


def deepspeed_zero_stage(deepspeed: Any) -> int | None:
    """ZeRO stage of an axolotl ``deepspeed:`` value (path to a JSON file or an inline dict)."""
    config = _deepspeed_config(deepspeed)
    if config is not None:
        stage = (config.get("zero_optimization") or {}).get("stage")
        return int(stage) if isinstance(stage, int) else None
    if isinstance(deepspeed, str) and "zero3" in os.path.basename(deepspeed):  # a name axolotl resolves itself
        return 3
    return None


def _task_type(model: Any) -> str:
    """PEFT task type for ``model``: sequence/token classification heads, else causal LM."""
    name = type(model).__name__ if model is not None else ""
    if "SequenceClassification" in name:
        return "SEQ_CLS"
    if "TokenClassification" in name:
        return "TOKEN_CLS"
    return "CAUSAL_LM"


def peft_config_from_cfg(spec: MethodSpec, cfg: Any, model: Any = None) -> Any:
    """The method's ``PeftConfig`` from an axolotl config (dict, ``DictDefault`` or args model).

    Unset keys keep the config class's defaults. The config class's own validation errors
    are re-raised as ``ValueError`` naming the YAML keys (``NeuroAdaConfig.top_k`` ->
    ``neuroada_top_k``).
    """
    config_cls = spec.config_class()
    names = {f.name for f in exposed_fields(spec)}
    kwargs: dict[str, Any] = {}
    for field_name in sorted(names):
        value = cfg_get(cfg, yaml_key(spec, field_name))
        if value is not None:
            kwargs[field_name] = value
    if "modules_to_save" in names and "modules_to_save" not in kwargs:
        lora_modules = cfg_get(cfg, "lora_modules_to_save")
        if lora_modules:
            kwargs["modules_to_save"] = list(lora_modules)
    try:
        return config_cls(task_type=_task_type(model), **kwargs)
    except (TypeError, ValueError) as error:
        message = str(error).replace(f"{config_cls.__name__}.", spec.yaml_prefix)
        raise ValueError(f"Invalid `adapter: {spec.name}` settings: {message}") from error


class ValidatedMethodArgs(MethodArgsBase):
    """Validators of the generated args model; they see the whole YAML (Axolotl merges the model into its own)."""

    @model_validator(mode="before")
    @classmethod
    def _neuroada_plugin_check_raw_config(cls, data: Any) -> Any:
        """Reject, with the offending key named, what would otherwise be ignored or fail late."""
        if not isinstance(data, Mapping):
            return data
        # cls is Axolotl's config model with every plugin's args mixed in: its keys are what Axolotl keeps.
        known = model_keys(cls) | axolotl_config_keys()
        for spec in cls._specs():
            data = check_raw_config(spec, data, known)
        return data

    @model_validator(mode="after")
    def _neuroada_plugin_build_peft_config(self) -> ValidatedMethodArgs:
        """Build the selected method's ``PeftConfig`` once, so its own validation runs before any loading."""
        for spec in type(self)._specs():
            if getattr(self, "adapter", None) == spec.name:
                peft_config_from_cfg(spec, self)
        return self

    @classmethod
    def _specs(cls) -> list[MethodSpec]:
        """Methods of every generated args model in the class hierarchy (several plugins may be merged)."""
        specs: list[MethodSpec] = []
        for klass in cls.__mro__:
            for spec in klass.__dict__.get("peft_methods", ()):
                if spec not in specs:
                    specs.append(spec)
        return specs

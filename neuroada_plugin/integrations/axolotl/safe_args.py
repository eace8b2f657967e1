"""SAFE in Axolotl: ``safe: true`` and one ``safe_<field>`` YAML key per :class:`~neuroada_plugin.SAFEConfig` field.

SAFE is a training callback over whatever adapter trains (this package's methods or ``adapter: lora``),
so its keys are not a method's: they are generated here from ``SAFEConfig`` by the same field ->
pydantic machinery as the ``<method>_<field>`` keys (:mod:`.args`: strict types, ``None`` default,
``metadata["help"]`` and ``ge``/``le`` bounds), and checked here with the same spelling rules as the
method keys (:mod:`.validation`). The plugin adds ``SAFECallback(**settings)`` through Axolotl's
``add_callbacks_post_trainer`` hook (:func:`safe_callbacks`)::

    plugins:
      - neuroada_plugin.axolotl.NeuroAdaPlugin
    adapter: lora          # or neuroada, neat, ...
    safe: true
    safe_max_threshold: 0.6
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Collection, Mapping
from typing import Any

from pydantic import BaseModel, Field, StrictBool, create_model, model_validator

from ...safe.config import SAFEConfig
from .args import _field_definition
from .validation import _folded, _yaml_value, axolotl_config_keys, cfg_get, model_keys, prefixed_misspelling_distance

__all__ = ["ENABLE_KEY", "PREFIX", "SafeArgs", "check_safe_keys", "safe_callbacks", "safe_keys", "safe_settings"]

ENABLE_KEY = "safe"
PREFIX = "safe_"


def safe_keys() -> dict[str, str]:
    """YAML key -> SAFEConfig field (``safe_max_threshold`` -> ``max_threshold``)."""
    return {PREFIX + f.name: f.name for f in dataclasses.fields(SAFEConfig)}


def _listed() -> str:
    return ", ".join([ENABLE_KEY, *safe_keys()])


def _suggestion(key: str) -> str | None:
    """The ``safe_*`` key that ``key`` misspells (nearest first), or ``None``."""
    best: tuple[int, str] | None = None
    for target, field_name in safe_keys().items():
        distance = prefixed_misspelling_distance(key, PREFIX, field_name)
        if distance is not None and (best is None or distance < best[0]):
            best = (distance, target)
    return None if best is None else best[1]


def check_safe_keys(data: Mapping[str, Any], known: Collection[str]) -> None:
    """Refuse misspelt ``safe_*`` keys, SAFE settings without ``safe: true``, and SAFE where it cannot run.

    ``known``: the keys the config being validated declares; a key in it is never called misspelt.
    """
    declared = safe_keys()
    unknown = []
    for key in data:
        if not isinstance(key, str) or key in known or key in declared or key == ENABLE_KEY:
            continue
        if _folded(key).startswith(PREFIX):  # every undeclared key after SAFE's prefix is refused
            close = _suggestion(key) or next(iter(difflib.get_close_matches(_folded(key), declared, n=1)), None)
            unknown.append(f"`{key}`" + (f" (did you mean `{close}`?)" if close else ""))
        elif data[key] is not None and (close := _suggestion(key)) is not None:
            unknown.append(f"`{key}` (did you mean `{close}`? Write `{close}: {_yaml_value(data[key])}` instead)")
    if unknown:
        raise ValueError(
            f"Unknown SAFE key(s), which Axolotl would ignore silently: {', '.join(unknown)}. SAFE's keys: {_listed()}."
        )
    used = [key for key in declared if data.get(key) is not None]
    enabled = data.get(ENABLE_KEY)
    if used and enabled is not True:
        raise ValueError(
            f"{', '.join(f'`{key}`' for key in used)} set, but `safe:` is {enabled!r}: these keys configure SAFE "
            "(selective adapter freezing). Add `safe: true` or remove them."
        )
    if enabled is not True:
        return
    if not data.get("adapter"):
        raise ValueError(
            "`safe: true` freezes adapters, but no `adapter:` is set (full fine-tuning). Set `adapter:` "
            "(lora, neuroada, ...) or remove `safe: true`."
        )
    sharded = [key for key in ("deepspeed", "fsdp", "fsdp_config") if data.get(key)]
    if sharded:
        raise ValueError(
            f"`safe: true` cannot run with {', '.join(f'`{key}`' for key in sharded)}: SAFE changes which parameters "
            "train in the middle of the run, while FSDP/DeepSpeed fix the trainable set when they wrap the model. "
            "Train with DDP or a single process, or remove `safe: true`."
        )


def safe_settings(cfg: Any) -> dict[str, Any]:
    """The SAFEConfig keyword arguments set in ``cfg`` (unset keys keep SAFEConfig's defaults)."""
    return {name: value for key, name in safe_keys().items() if (value := cfg_get(cfg, key)) is not None}


def safe_config(cfg: Any) -> SAFEConfig:
    """``SAFEConfig`` of ``cfg``; its own errors re-raised naming the YAML keys (``warmup_steps`` -> ``safe_...``)."""
    try:
        return SAFEConfig(**safe_settings(cfg))
    except (TypeError, ValueError) as error:
        message = str(error).removeprefix("SAFE ")
        for key, name in safe_keys().items():
            message = re.sub(rf"(?<![\w]){name}\b", key, message)
        raise ValueError(f"Invalid SAFE settings: {message}") from error


def safe_callbacks(cfg: Any) -> list:
    """``[SAFECallback(...)]`` when ``cfg`` has ``safe: true``, else ``[]``."""
    if cfg_get(cfg, ENABLE_KEY) is not True:
        return []
    from ...safe.callback import SAFECallback

    return [SAFECallback(safe_config(cfg))]


class SafeArgsBase(BaseModel):
    """Validators of the generated SAFE keys; they see the whole YAML (Axolotl merges the model into its own)."""

    @model_validator(mode="before")
    @classmethod
    def _neuroada_plugin_check_safe_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            check_safe_keys(data, model_keys(cls) | axolotl_config_keys())
        return data

    @model_validator(mode="after")
    def _neuroada_plugin_build_safe_config(self) -> SafeArgsBase:
        """Run SAFEConfig's own checks (e.g. freeze end after warm-up) before anything loads."""
        if getattr(self, ENABLE_KEY, None) is True:
            safe_config(self)
        return self


SafeArgs = create_model(
    "SafeArgs",
    __base__=SafeArgsBase,
    __module__=__name__,
    safe=(
        StrictBool | None,
        Field(default=None, description="Selective adapter freezing (SAFE, docs/safe.md) over the trained adapter."),
    ),
    **{PREFIX + field.name: _field_definition(SAFEConfig, field) for field in dataclasses.fields(SAFEConfig)},
)

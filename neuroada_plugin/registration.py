"""Make a plugin-defined tuner a native PEFT method.

PEFT's ``register_peft_method`` only accepts names that already exist in its closed
``PeftType`` enum, and refuses a second registration. This module adds the enum member
(without touching PEFT's files) and registers the method idempotently, so that importing
the plugin twice, or ``importlib.reload``-ing it, never fails. Nothing here is specific to
NeuroAda: every method of this plugin registers through :func:`register_method`.
"""

from __future__ import annotations

from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.utils import PeftType
from peft.utils.peft_types import register_peft_method

__all__ = ["ensure_peft_type", "register_method", "registered_methods"]

_REGISTERED: dict[str, tuple[type, type]] = {}


def ensure_peft_type(name: str) -> PeftType:
    """Return the ``PeftType`` member called ``name`` (upper case), adding it if PEFT lacks it.

    The member is a real ``PeftType`` instance (``PeftType("NAME")``, ``PeftType.NAME``,
    ``PeftType["NAME"]``, iteration and ``.value`` all work), because PEFT code calls enum
    methods on ``config.peft_type``.
    """
    member_name = name.upper()
    existing = PeftType._member_map_.get(member_name)
    if existing is not None:
        return existing  # type: ignore[return-value]

    member = str.__new__(PeftType, member_name)
    member._name_ = member_name
    member._value_ = member_name
    member.__objclass__ = PeftType  # type: ignore[attr-defined]
    if hasattr(PeftType, "_sort_order_"):
        member._sort_order_ = len(PeftType._member_names_)  # type: ignore[attr-defined]
    member.__init__(member_name)
    # type.__setattr__ bypasses EnumType.__setattr__, which forbids assigning members.
    type.__setattr__(PeftType, member_name, member)
    PeftType._member_map_[member_name] = member
    PeftType._value2member_map_[member_name] = member
    PeftType._member_names_.append(member_name)
    return member


def register_method(*, name: str, config_cls: type, model_cls: type, prefix: str | None = None) -> PeftType:
    """Register a tuner with PEFT under ``name`` (lower case); safe to call repeatedly.

    A repeated call with new classes (after ``importlib.reload``) points PEFT's mappings at
    the new classes instead of raising "There is already PEFT method called ...".
    """
    peft_type = ensure_peft_type(name)
    prefix = prefix if prefix is not None else f"{name}_"
    if peft_type not in PEFT_TYPE_TO_TUNER_MAPPING:
        register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)
    else:
        if PEFT_TYPE_TO_PREFIX_MAPPING.get(peft_type) != prefix:
            raise ValueError(
                f"PEFT method {name!r} is already registered with prefix "
                f"{PEFT_TYPE_TO_PREFIX_MAPPING.get(peft_type)!r}, not {prefix!r}."
            )
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
        PEFT_TYPE_TO_MIXED_MODEL_MAPPING.pop(peft_type, None)
    _REGISTERED[name] = (config_cls, model_cls)
    return peft_type


def registered_methods() -> dict[str, tuple[type, type]]:
    """Methods this plugin registered in this process: name -> (config class, tuner class)."""
    return dict(_REGISTERED)

"""Make every method of the registry a native PEFT method.

PEFT's ``register_peft_method`` only accepts names that already exist in its closed
``PeftType`` enum, and refuses a second registration. This module adds the enum member
(without touching PEFT's files) and registers each method idempotently, so that importing
the package twice, ``importlib.reload``-ing it, or calling :func:`register_all` again never
fails. Nothing here is specific to one method: every :class:`~neuroada_plugin.registry.MethodSpec`
registers through :func:`register_method`.

Who calls what:

* :func:`register_all`: ``import neuroada_plugin`` when ``peft`` is already imported, else the
  start-up hook (``neuroada_plugin_autoload``) the moment ``peft`` is imported.
* :func:`ensure_registered`: a method's config ``__post_init__`` (so creating a config always
  leaves its method registered, whatever was imported first) and tests that register a toy
  method after PEFT registration already ran.

This module imports PEFT; the registry (:mod:`neuroada_plugin.registry`) does not.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Any

from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.utils import PeftType
from peft.utils.peft_types import register_peft_method

from .registry import ExternalMethodWarning, MethodSpec, discard_broken, get_method, method_origin, methods

__all__ = ["ensure_peft_type", "ensure_registered", "register_all", "register_method", "registered_methods"]

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
    """Methods registered with PEFT in this process: name -> (config class, tuner class)."""
    return dict(_REGISTERED)


def _initializing(module_name: str | None) -> bool:
    """Whether ``module_name`` is being imported right now (its ``__init__``/body has not finished)."""
    module = sys.modules.get(module_name or "")
    return module is not None and bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _load_when_ready(path: str) -> Any | None:
    """Import ``"pkg.module:Attr"``; ``None`` when that module (or one it needs) is still mid-import.

    That happens when the first ``import peft`` of a process comes from inside one of the method's
    own modules (``import neuroada_plugin.neuroada.layer`` before anything else): the start-up hook
    runs while that module is half-executed. The method then registers later, from its config's
    ``__post_init__`` (:func:`ensure_registered`) or the next :func:`register_all`.
    """
    module_name, _, attribute = path.partition(":") if ":" in path else path.rpartition(".")
    if _initializing(module_name):
        return None
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        if _initializing(error.name):  # "cannot import name X from partially initialized module Y"
            return None
        raise
    return getattr(module, attribute)


def _register_spec(spec: MethodSpec) -> PeftType:
    peft_type = ensure_peft_type(spec.name)
    config_cls = _load_when_ready(spec.config)
    model_cls = _load_when_ready(spec.tuner) if config_cls is not None else None
    if config_cls is None or model_cls is None:
        return peft_type  # mid-import: registers on the next call
    if _REGISTERED.get(spec.name) != (config_cls, model_cls):
        register_method(name=spec.name, config_cls=config_cls, model_cls=model_cls, prefix=spec.prefix)
    return peft_type


def ensure_registered(name: str) -> PeftType:
    """Register method ``name`` of the registry with PEFT if it is not yet; return its ``PeftType``.

    Cheap when already registered. The ``PeftType`` member exists on return even when the
    method's own modules are still being imported (registration then completes on a later call).
    """
    return _register_spec(get_method(name))


def register_all() -> list[str]:
    """Register every method of the registry with PEFT (idempotent); return the registered names.

    A method from outside this package whose classes fail to import (a broken or mismatched
    third-party package) is dropped from the registry with a warning: this runs inside ``import peft``
    (start-up hook), which must keep working, with the other methods registered; dropped, it cannot
    break the Axolotl plugin either. A built-in that fails still raises.
    """
    for spec in methods().values():
        try:
            _register_spec(spec)
        except Exception as error:
            origin = method_origin(spec.name)
            if origin is None:
                raise
            discard_broken(spec.name, f"registering it with PEFT raised {type(error).__name__}: {error}")
            warnings.warn(
                f"neuroada_plugin could not register the method {spec.name!r} ({origin}) with PEFT: "
                f"{type(error).__name__}: {error}. Its adapters cannot be created or loaded; the other methods "
                "work. Reinstall the package that provides it (a version that matches this neuroada_plugin), or "
                "uninstall it.",
                ExternalMethodWarning,
                stacklevel=2,
            )
    return sorted(_REGISTERED)


# When the `import peft` above was the process's first, the start-up hook fired inside it and,
# unable to call into this half-imported module, left this flag: register now that it is complete.
if globals().pop("_registration_deferred", False):
    register_all()

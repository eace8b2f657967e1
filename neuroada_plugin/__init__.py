"""neuroada-plugin: NeuroAda and sibling fine-tuning methods as native PEFT methods.

Every method of the registry (:mod:`neuroada_plugin.registry`) becomes a PEFT method
(``PeftType.NEUROADA``, ...), after which ``get_peft_model``, ``PeftModel.from_pretrained``,
``AutoPeftModelForCausalLM`` and ``AutoModelForCausalLM.from_pretrained(adapter_dir)`` accept
its adapters. Registration happens now if ``peft`` is already imported, otherwise the moment it
is (a start-up hook, also installed as a ``.pth`` file so that a saved adapter loads even in a
process that never imports this package).

Importing this package imports neither PEFT nor Transformers (the merge CLI starts in well under
a second); the classes below are loaded on first access.
"""

from __future__ import annotations

import importlib
import sys

from ._lazy import lazy_exports
from .errors import AdapterCheckpointError, MergeError, UnsupportedTargetError

__version__ = "0.1.0"

_LAZY = {
    **{name: "neuroada" for name in ("NeuroAdaLayer", "select_connections")},
    **{name: "safe" for name in ("SAFECallback", "SAFEConfig")},  # a training callback, not a method
    "restore_adapter_dtypes": "kit.adapter_dtype",  # undo a trainer's bf16 cast on quantized bases
}


def _method_classes() -> dict[str, str]:
    """Config and tuner class of every built-in method, by class name -> module (from the registry)."""
    from .registry import methods

    found = {}
    for spec in methods().values():
        for path in (spec.config, spec.tuner):
            module, _, name = path.partition(":")
            if module.startswith(f"{__name__}."):
                found[name] = module
    return found


__all__ = [
    "AdapterCheckpointError",
    "MergeError",
    "UnsupportedTargetError",
    "__version__",
    *_LAZY,
    *sorted(_method_classes()),
]

_lazy_getattr, _lazy_dir = lazy_exports(__name__, _LAZY)


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return _lazy_getattr(name)
    module = _method_classes().get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import peft  # noqa: F401  (first, on its own: the start-up hook registers every method with PEFT)

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*_lazy_dir(), *__all__})


def _register_with_peft() -> None:
    if "peft" in sys.modules:
        from .peft_registration import register_all

        register_all()
        return
    try:
        import neuroada_plugin_autoload
    except ImportError:  # the hook module is not installed beside the package: register eagerly
        from .peft_registration import register_all

        register_all()
        return
    neuroada_plugin_autoload.install(force=True)


_register_with_peft()

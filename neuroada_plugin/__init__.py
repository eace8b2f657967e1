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

import sys

from ._lazy import lazy_exports
from .errors import AdapterCheckpointError, MergeError, UnsupportedTargetError

__version__ = "0.1.0"

__all__ = [
    "AdapterCheckpointError",
    "MergeError",
    "NeatConfig",
    "NeatModel",
    "NeuroAdaConfig",
    "NeuroAdaLayer",
    "NeuroAdaModel",
    "UnsupportedTargetError",
    "__version__",
    "select_connections",
]

_LAZY = {
    **{name: "neuroada" for name in ("NeuroAdaConfig", "NeuroAdaLayer", "NeuroAdaModel", "select_connections")},
    **{name: "neat" for name in ("NeatConfig", "NeatModel")},
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


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

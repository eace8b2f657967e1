"""Start-up hook: register neuroada_plugin's PEFT methods the moment ``peft`` is imported.

Installed with a ``.pth`` file, this module runs at interpreter start. It imports nothing
heavy: it only puts a finder on ``sys.meta_path`` that waits for ``import peft`` and then,
once ``peft`` has finished importing, registers every method of neuroada_plugin's registry
with PEFT (``PeftType.NEUROADA``, ...). That lets ``PeftModel.from_pretrained``,
``AutoPeftModelForCausalLM`` and ``AutoModelForCausalLM.from_pretrained(adapter_dir)`` load
NeuroAda adapters in a process that never imports the plugin (a ``vllm`` worker, a TRL
script, a notebook). Set ``NEUROADA_PLUGIN_NO_AUTOLOAD=1`` to switch it off at start-up; an
explicit ``import neuroada_plugin`` arms it anyway (``install(force=True)``), since that import
says the process wants the plugin's methods.
"""

from __future__ import annotations

import importlib.abc
import os
import sys
import warnings

_TRIGGER = "peft"


class _LoaderWrapper(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        _uninstall()
        self._loader.exec_module(module)
        try:
            _register()
        except Exception as error:  # never break `import peft` itself
            warnings.warn(f"neuroada_plugin could not register with PEFT: {error!r}", stacklevel=2)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _PeftImportFinder(importlib.abc.MetaPathFinder):
    """Fires once, when ``peft`` is first executed (not merely looked up), then removes itself."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TRIGGER:
            return None
        for finder in sys.meta_path:
            if isinstance(finder, _PeftImportFinder):
                continue
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _LoaderWrapper(spec.loader)
                return spec
        return None


def _uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _PeftImportFinder)]


_REGISTRATION = "neuroada_plugin.peft_registration"


def _register() -> None:
    registration = sys.modules.get(_REGISTRATION)
    if registration is not None and getattr(getattr(registration, "__spec__", None), "_initializing", False):
        # That module's own `import peft` fired the hook: it registers when its body finishes.
        registration._registration_deferred = True
        return
    from neuroada_plugin.peft_registration import register_all

    register_all()


def install(force: bool = False) -> None:
    """Arm the hook (idempotent); if ``peft`` is already imported, register right away.

    ``force``: arm it even when ``NEUROADA_PLUGIN_NO_AUTOLOAD`` is set (``import neuroada_plugin``
    passes it: an explicit import asks for the plugin's methods).
    """
    if not force and os.environ.get("NEUROADA_PLUGIN_NO_AUTOLOAD", "") not in ("", "0"):
        return
    if _TRIGGER in sys.modules:
        _register()
        return
    if not any(isinstance(f, _PeftImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PeftImportFinder())


install()

"""Lazy package exports: names that import their submodule on first access (PEP 562).

The package and its method folders export PEFT-dependent classes without importing PEFT, so
``import neuroada_plugin`` and the merge CLI stay fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, names: Mapping[str, str], needs_peft: frozenset[str] | set[str] = frozenset()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``names`` maps an exported name to its submodule.

    For names in ``needs_peft``, PEFT is imported first, on its own, so the start-up hook registers
    the methods while none of this package's PEFT-dependent modules is half-imported.
    """
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        if name in needs_peft:
            import peft  # noqa: F401
        value = getattr(importlib.import_module(f"{package}.{names[name]}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *names})

    return __getattr__, __dir__

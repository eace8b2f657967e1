"""Axolotl integration: ``adapter: <method>`` for every method of this package's registry.

Usage (see ``axolotl_configs/README.md``)::

    plugins:
      - neuroada_plugin.integrations.axolotl.MethodsPlugin   # or neuroada_plugin.axolotl.NeuroAdaPlugin
    adapter: neuroada
    neuroada_top_k: 1

Three modules, one job each: :mod:`.args` generates the ``<method>_<field>`` YAML keys from
each method's config dataclass, :mod:`.validation` checks a config (driven by the methods'
capability flags), :mod:`.plugin` is the plugin Axolotl calls. Importing this package needs
Axolotl; ``import neuroada_plugin`` does not.
"""

from __future__ import annotations

try:
    import axolotl.integrations.base  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised only without axolotl
    raise ImportError(
        "neuroada_plugin's Axolotl integration needs Axolotl (tested with axolotl==0.19.0), which is not "
        "importable here. From a checkout run `bash scripts/setup_axolotl.sh` and use `.venv-axolotl/bin/axolotl`; "
        "elsewhere `pip install axolotl==0.19.0 neuroada-plugin` (see axolotl_configs/README.md)."
    ) from error

from .plugin import MethodArgs, MethodsPlugin

__all__ = ["MethodArgs", "MethodsPlugin"]

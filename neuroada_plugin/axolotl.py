"""The Axolotl plugin path users write in their YAML: ``neuroada_plugin.axolotl.NeuroAdaPlugin``.

It is the package's one Axolotl plugin (:class:`neuroada_plugin.integrations.axolotl.MethodsPlugin`),
which offers ``adapter: neuroada`` and every other registered method::

    plugins:
      - neuroada_plugin.axolotl.NeuroAdaPlugin
    adapter: neuroada
    neuroada_top_k: 1
"""

from __future__ import annotations

from .integrations.axolotl import MethodArgs, MethodsPlugin

__all__ = ["NeuroAdaArgs", "NeuroAdaPlugin"]

NeuroAdaPlugin = MethodsPlugin
NeuroAdaArgs = MethodArgs

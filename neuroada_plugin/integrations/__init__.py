"""Integrations of this package's PEFT methods with training frameworks.

Everything here is method-agnostic: a module per framework provides a base that is
parameterised by a method (its name, ``PeftConfig`` class, config-key prefix, ...), and each
method exposes a thin instance of it (e.g. :mod:`neuroada_plugin.axolotl`). The framework
itself is imported only by its own submodule, so ``import neuroada_plugin`` never needs it.
"""

"""Exceptions raised by the plugin, one per kind of bad input, so callers can catch precisely.

Each subclasses the built-in exception a caller would already expect (ValueError, TypeError,
RuntimeError), so generic handlers keep working.
"""

from __future__ import annotations

__all__ = ["AdapterCheckpointError", "MergeError", "UnsupportedTargetError"]


class AdapterCheckpointError(ValueError):
    """A saved adapter does not fit the base model or is malformed (shapes, index dtype/range)."""


class UnsupportedTargetError(TypeError):
    """A targeted module cannot be adapted by the method (quantized, not an ``nn.Linear``, ...)."""


class MergeError(RuntimeError):
    """Merging an adapter would produce non-finite weights; the model is left unchanged."""

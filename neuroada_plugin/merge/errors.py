"""Errors of the checkpoint merge, one per kind of bad input, so callers and the CLI can tell them apart.

An adapter that does not fit its base raises :class:`neuroada_plugin.errors.AdapterCheckpointError`
(shared with the in-memory loader). The classes here cover the files themselves and the output.
"""

from __future__ import annotations

__all__ = ["CheckpointFileError", "InsufficientSpaceError", "OutputExistsError", "UnsupportedAdapterError"]


class CheckpointFileError(ValueError):
    """A checkpoint file is missing, truncated, corrupted, or in a format the merge cannot stream."""


class OutputExistsError(FileExistsError):
    """The output folder already exists and ``force`` was not given; nothing was written."""


class InsufficientSpaceError(OSError):
    """The output filesystem is (or became) full; no partial output is left behind."""


class UnsupportedAdapterError(ValueError):
    """No registered method (or no streaming merge rule) for the adapter's ``peft_type``."""

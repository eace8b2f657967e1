"""The README quick start's ``from common.offline_models import smollm2_checkpoint``: see :mod:`harness.models`."""

from harness.models import smollm2_checkpoint

__all__ = ["smollm2_checkpoint"]

"""``neuroada-merge``: the compatible alias of ``neuroada-plugin merge`` (same flags, same exit codes).

Also runnable as ``python -m neuroada_plugin.merge`` or ``python -m neuroada_plugin.merge.cli``.
The implementation is :mod:`neuroada_plugin.cli`.
"""

from __future__ import annotations

import sys

from ..cli import build_merge_parser as build_parser
from ..cli import merge_main as main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())

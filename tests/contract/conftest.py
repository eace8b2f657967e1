"""The method contract runs over every registered method, plus the test-only toy method of ``toy_method/``.

The toy is registered the way any external method would be: its folder registers a spec, and
``NEUROADA_PLUGIN_METHODS`` names it so that fresh processes (autoload, Axolotl) load it too.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CONTRACT_DIR = Path(__file__).resolve().parent
TOY_MODULE = "toy_method"

sys.path.insert(0, str(CONTRACT_DIR))
_extra = [m for m in os.environ.get("NEUROADA_PLUGIN_METHODS", "").split(",") if m]
os.environ["NEUROADA_PLUGIN_METHODS"] = ",".join([*_extra, TOY_MODULE] if TOY_MODULE not in _extra else _extra)

import toy_method  # noqa: E402,F401  (registers the toy's spec)

from neuroada_plugin.peft_registration import register_all  # noqa: E402

register_all()  # the toy was registered after PEFT was imported: make it known to PEFT now

"""The method contract runs over every registered method, plus the test-only toy method of ``toy_method/``.

The toy is registered the way any external method would be: its folder registers a spec when
imported (here, by this conftest), and the contract's fresh processes (autoload, Axolotl) get
``NEUROADA_PLUGIN_METHODS=toy_method`` so they load it too. This process's environment is left
alone: other tests' subprocesses cannot import the toy.
"""

from __future__ import annotations

import sys
from pathlib import Path

CONTRACT_DIR = Path(__file__).resolve().parent

sys.path.insert(0, str(CONTRACT_DIR))

import toy_method  # noqa: E402,F401  (registers the toy's spec)

from neuroada_plugin.peft_registration import register_all  # noqa: E402

register_all()  # the toy was registered after PEFT was imported: make it known to PEFT now

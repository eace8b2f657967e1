"""``python -m neuroada_plugin.merge`` = the ``neuroada-merge`` console script."""

import sys

from .cli import main

sys.exit(main())

"""``python -m neuroada_plugin`` = the ``neuroada-plugin`` console script."""

import sys

from .cli import main

sys.exit(main())

"""``python -m neuroada_plugin.merge`` = the ``neuroada-merge`` console script."""

import sys

from ..cli import merge_main

sys.exit(merge_main())

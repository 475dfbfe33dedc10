"""``python -m fastcache.tuning``: see :mod:`fastcache.tuning.cli`."""

import sys

from .cli import main

sys.exit(main())

"""``python -m bz``: the same as the ``bz`` command (torchrun launches it this way)."""

import sys

from bz.cli import main

sys.exit(main())

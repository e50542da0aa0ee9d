"""``python -m bz``: the same as the ``bz`` command (torchrun launches it this way)."""

from bz.commands import main

main()

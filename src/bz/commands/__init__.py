"""The ``bz`` command line, apart from the library it drives.

One module per command family (``train``: train, validate, check-config; ``catalog``:
list-plugins, list-metrics; ``schema``: config-schema; ``tune``; ``report``; ``init``;
``health``), the options they share in :mod:`bz.commands.options`, and the group in
:mod:`bz.commands.main`. Commands parse, call the library, render; the library never
imports this package.
"""

from bz.commands.main import cli, main

__all__ = ["cli", "main"]

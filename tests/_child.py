"""The entry of the ``python -c`` processes the fault tests start: ``bz ARGS`` with the
faults of a support module installed where training runs.

``bz train`` run as a program supervises: it starts the same command line again as its
training process and trains nothing itself. The faults (a signal at a step, a kill in a
checkpoint write) belong in that training process, so the supervising one runs plain
``bz`` and never imports torch, as the real ``bz train``'s supervisor does
(tests/integration/test_supervisor.py): a torch import there cost every supervised run
in these tests seconds of CPU before its training process even started.
"""

from __future__ import annotations

import importlib
import os
import sys

from bz import _supervision


def main(faults: str) -> None:
    """``bz`` with ``sys.argv[1:]``; in a process that trains, through ``faults``'s
    ``child_main`` (a module of tests/ whose ``child_main`` installs them and runs bz)."""
    if _supervises(sys.argv[1:]):
        from bz.commands import main as bz_main

        bz_main(sys.argv[1:])
        return
    importlib.import_module(faults).child_main()


def _supervises(argv: list[str]) -> bool:
    """Whether ``bz ARGS`` here is a supervising ``bz train`` (the rule of
    ``bz.commands.supervise.may_supervise``): one training process, not itself a child."""
    return (
        argv[:1] == ["train"]
        and not any(arg.startswith("--nproc-per-node") for arg in argv)
        and not os.environ.get(_supervision.SUPERVISOR_ENV)
        and "LOCAL_RANK" not in os.environ
        and "WORLD_SIZE" not in os.environ
    )


FAULT_CHILD = "from tests._child import main; main('tests._fault_support')"
"""``python -c`` code of a ``bz`` that dies at a step (:mod:`tests._fault_support`)."""
STORE_CHILD = "from tests._child import main; main('tests._checkpoint_support')"
"""``python -c`` code of a ``bz`` with the checkpoint store's faults too
(:mod:`tests._checkpoint_support`)."""

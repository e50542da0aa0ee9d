"""The entry of the ``python -c`` processes the fault tests start: ``bz ARGS`` with the
faults of a support module installed where training runs.

``bz train`` run as a program supervises: it starts the same command line again as its
training process and trains nothing itself. The faults (a signal at a step, a kill in a
checkpoint write) belong in that training process, so the supervising one runs plain
``bz`` and never imports torch, as the real ``bz train``'s supervisor does
(tests/integration/test_supervisor.py): a torch import there cost every supervised run
in these tests seconds of CPU before its training process even started.

``BZ_TEST_SHORT_WAITS=1`` shortens, in both processes, the two fixed waits of a hook that
never returns (see :func:`short_waits`): a test that shows what happens after them waits
seconds, not the defaults' 10 and 15 (which tests/unit pin).
"""

from __future__ import annotations

import importlib
import os
import sys

from bz import _supervision

SHORT_WAITS_ENV = "BZ_TEST_SHORT_WAITS"
EXIT_AFTER_S = 2.0
"""``bz.plugins._watchdog.EXIT_AFTER_S`` under ``BZ_TEST_SHORT_WAITS``: past ``GRACE_S``
(1 s), when the force starts, as the default is."""
HUNG_AFTER_S = 3.0
"""``bz.commands.supervise.HUNG_AFTER_S`` under ``BZ_TEST_SHORT_WAITS``: longer than
:data:`EXIT_AFTER_S`, as the default is, so a hook that lets the interpreter run is
still ended by the training process's own escalation, not by the supervisor."""


def main(faults: str | None = None) -> None:
    """``bz`` with ``sys.argv[1:]``; in a process that trains, through ``faults``'s
    ``child_main`` (a module of tests/ whose ``child_main`` installs them and runs bz),
    or plain ``bz`` without ``faults``."""
    supervises = _supervises(sys.argv[1:])
    if os.environ.get(SHORT_WAITS_ENV):
        short_waits(supervises)
    if supervises or faults is None:
        from bz.commands import main as bz_main

        bz_main(sys.argv[1:])
        return
    importlib.import_module(faults).child_main()


def short_waits(supervises: bool) -> None:
    """The fixed waits for a hook that never returns, shortened in this process: how long
    after its interruption the training process ends (``EXIT_AFTER_S``, also in the
    message it ends with) and how long past ``plugin_timeout`` the supervisor waits for a
    heartbeat before it kills the training process (``HUNG_AFTER_S``)."""
    if supervises:  # the supervisor: the one wait it has, without importing torch
        from bz.commands import supervise

        supervise.HUNG_AFTER_S = HUNG_AFTER_S
        return
    from bz.plugins import _faults, _watchdog

    _watchdog.EXIT_AFTER_S = EXIT_AFTER_S  # read when an escalation starts
    vars(_faults)["EXIT_AFTER_S"] = EXIT_AFTER_S  # the message's copy (imported by name)


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
BZ_CHILD = "from tests._child import main; main()"
"""``python -c`` code of a plain ``bz`` (for ``BZ_TEST_SHORT_WAITS``)."""

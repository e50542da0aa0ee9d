"""The command line's log lines: a signal handler may log in the middle of another line.

Ctrl-C and SIGTERM log ``interrupt_requested`` from their handler, which Python runs in
the main thread between two bytecodes, possibly while that thread is writing a line.
The handler must neither wait for the line it interrupted (it would wait forever: the
process hung, and a plugin whose line it was got blamed when ``plugin_timeout`` ran
out) nor write into the middle of it.
"""

from __future__ import annotations

import io
import json
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog

from bz._logging import configure, get_logger
from bz.training.interrupts import InterruptGuard


class _Interrupting(io.StringIO):
    """A stream that runs ``during`` once, in the middle of the first line written."""

    def __init__(self) -> None:
        super().__init__()
        self.during: Callable[[], None] | None = None

    def write(self, text: str, /) -> int:
        during, self.during = self.during, None
        if during is not None:
            half = len(text) // 2
            written = super().write(text[:half])
            during()  # the signal arrives here
            return written + super().write(text[half:])
        return super().write(text)


@pytest.fixture
def cli_logging() -> Iterator[None]:
    saved = structlog.get_config()
    try:
        yield
    finally:
        structlog.configure(**saved)


@pytest.mark.parametrize("log_format", ["json", "console"])
@pytest.mark.usefixtures("cli_logging")
def test_a_line_logged_by_a_signal_handler_comes_whole_right_after_the_one_it_interrupted(
    log_format: str,
) -> None:
    stream = _Interrupting()
    configure("json" if log_format == "json" else "console", "info", stream)
    guard = InterruptGuard()
    stream.during = lambda: guard._handle(signal.SIGTERM.value, None)
    # In a thread of its own, so that a handler waiting forever fails the test.
    writer = threading.Thread(
        target=lambda: get_logger("bz").info("early_stopping_restored", epoch=1), daemon=True
    )
    writer.start()
    writer.join(timeout=60)
    assert not writer.is_alive(), "the handler waited for the line it interrupted"
    assert guard.requested
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    if log_format == "json":
        assert [json.loads(line)["event"] for line in lines] == [
            "early_stopping_restored",
            "interrupt_requested",
        ]
    else:
        assert "early_stopping_restored" in lines[0]
        assert "interrupt_requested" in lines[1]


_SECRET = "sk-live-0123456789abcdef"


class _LeakyPlugin:
    """A plugin that fails while an API key sits in one of its frame's locals."""

    name = "leaky"

    def end_epoch(self, context: object) -> None:
        api_key = _SECRET
        self._send(api_key)

    def _send(self, token: str) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        raise ConnectionError(f"upload refused ({len(headers)} header)")


@pytest.mark.parametrize("log_format", ["json", "console"])
@pytest.mark.usefixtures("cli_logging")
def test_a_plugins_traceback_never_shows_its_locals(log_format: str) -> None:
    from bz.testing import run_plugin

    stream = io.StringIO()
    configure("json" if log_format == "json" else "console", "info", stream)
    result = run_plugin(_LeakyPlugin(), epochs=1, policy="isolate")
    output = stream.getvalue()
    # The fault is reported, traceback and all, only without the values of locals.
    assert [r.fault is not None for r in result.plugins] == [True]
    assert "plugin_failed" in output
    assert "ConnectionError: upload refused" in output or (
        log_format == "json" and "upload refused" in output
    )
    assert "_send" in output  # the frames are there
    assert _SECRET not in output


@pytest.mark.usefixtures("cli_logging")
def test_a_plugin_that_cannot_use_its_folder_is_one_line_on_the_console(tmp_path: Path) -> None:
    from bz.plugins.csv_logger import CsvLogger, CsvLoggerConfig
    from bz.testing import run_plugin

    (tmp_path / "file").write_text("", encoding="utf-8")
    stream = io.StringIO()
    configure("console", "info", stream)
    plugin = CsvLogger(CsvLoggerConfig(log_dir=str(tmp_path / "file" / "csv")))
    run_plugin(plugin, epochs=1, policy="isolate")
    failed = [line for line in stream.getvalue().splitlines() if "plugin_failed" in line]
    assert len(failed) == 1
    assert "csv_logger" in failed[0]
    assert str(tmp_path / "file") in failed[0]
    assert "Traceback" not in stream.getvalue()


@pytest.mark.usefixtures("cli_logging")
def test_a_signal_during_a_line_of_the_hosts_own_structlog_logger_does_not_hang() -> None:
    # An embedder's structlog writes through PrintLogger, whose lock is not reentrant:
    # bz's handler logging into it mid-line would wait forever on its own thread.
    stream = _Interrupting()
    structlog.configure(
        processors=[structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    guard = InterruptGuard()
    stream.during = lambda: guard._handle(signal.SIGTERM.value, None)
    writer = threading.Thread(
        target=lambda: structlog.get_logger("host").info("hosts_own_line"), daemon=True
    )
    writer.start()
    writer.join(timeout=60)
    assert not writer.is_alive(), "bz's handler waited for the host's line it interrupted"
    assert guard.requested
    guard.flush_report(timeout=60)
    events = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
    assert events == ["hosts_own_line", "interrupt_requested"]

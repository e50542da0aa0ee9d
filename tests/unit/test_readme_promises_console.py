"""console_out's colour follows ``NO_COLOR`` and ``FORCE_COLOR`` (README, "Plugins").

``NO_COLOR`` was tested; ``FORCE_COLOR`` was not: it colours the summary lines off a
terminal too (a CI log that renders ANSI), and ``NO_COLOR`` wins over it.
"""

from __future__ import annotations

import io

import pytest
from tests.unit.test_builtin_plugins import run_console

BOLD = "\x1b[1m"


def test_force_color_colours_the_summary_off_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("FORCE_COLOR", "1")
    output = run_console(io.StringIO(), model_summary=False)
    assert f"{BOLD}epoch 1/2" in output
    assert "█" not in output  # colour, not bars: those still need a terminal


def test_without_force_color_a_stream_gets_no_colour(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    assert "\x1b" not in run_console(io.StringIO(), model_summary=False)


def test_no_color_wins_over_force_color(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert "\x1b" not in run_console(io.StringIO(), model_summary=False)

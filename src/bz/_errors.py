"""The errors bz reports to people, and the exit code each one means.

bz's own failures are these classes (all exported from ``bz``); an exception raised by
the user's code is not wrapped in one: it keeps its type and gets a note
(:func:`add_training_context`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence


class BzError(Exception):
    """Base of the errors bz reports as one line, without a traceback."""

    exit_code: int = 1


class UsageError(BzError):
    """Bad input: configuration, command line, ``train.py`` or a plugin package (exit 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """One or more problems in a configuration, each with its JSON path.

    ``problems`` holds ``(path, message)`` pairs, e.g.
    ``("plugins[1].my_plugin.log_interval", 'expected int, got "5x"')``.
    """

    def __init__(self, problems: Sequence[tuple[str, str]], source: str | None = None) -> None:
        self.problems: tuple[tuple[str, str], ...] = tuple(problems)
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        """One line per problem: ``source: path: message``."""
        where = f"{self.source}: " if self.source else ""
        return "\n".join(
            _one_line(f"{where}{path}: {message}" if path else f"{where}{message}")
            for path, message in self.problems
        )

    def with_source(self, source: str) -> ConfigError:
        """The same problems, attributed to a file."""
        return ConfigError(self.problems, source)


def _one_line(text: str) -> str:
    """``text`` with line breaks and other unprintable characters escaped: a key in the
    file may hold a newline, and a problem must still be one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class TrainingError(BzError):
    """Training started and failed (exit 1)."""

    exit_code = 1


# -- exceptions from the user's code ---------------------------------------------------------

_CONTEXT_ATTRIBUTE = "_bz_failure"


def add_training_context(exc: BaseException, *, epoch: int, step: int, where: str) -> None:
    """Attach where training failed to ``exc`` without changing its type.

    An exception raised by the user's code (a ``ValueError`` in the loss, say) leaves
    ``fit`` as itself, so ``except ValueError`` in the host still catches it; bz adds a
    PEP 678 note (shown under the traceback) naming the epoch, step and place.
    """
    summary = f"training failed at epoch {epoch}, step {step}"
    exc.add_note(f"bz: {summary} ({where})")
    # The CLI's one-line rendering reads the summary back; a note is text for people.
    with contextlib.suppress(AttributeError):  # an exception type that refuses attributes
        setattr(exc, _CONTEXT_ATTRIBUTE, summary)


def training_context(exc: BaseException) -> str | None:
    """``training failed at epoch E, step S`` when bz attached it to ``exc``, else None."""
    summary = getattr(exc, _CONTEXT_ATTRIBUTE, None)
    return summary if isinstance(summary, str) else None


def describe_exception(exc: BaseException) -> str:
    """``ExceptionType: message`` (the message may be empty): a failure in one line."""
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__

"""The errors bz reports to people, and the exit code each one means."""

from __future__ import annotations

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
            f"{where}{path}: {message}" if path else f"{where}{message}"
            for path, message in self.problems
        )

    def with_source(self, source: str) -> ConfigError:
        """The same problems, attributed to a file."""
        return ConfigError(self.problems, source)


class TrainingError(BzError):
    """Training started and failed (exit 1)."""

    exit_code = 1

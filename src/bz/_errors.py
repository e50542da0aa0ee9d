"""The errors bz reports to people, and the exit code each one means.

bz's own failures are these classes (all exported from ``bz``); an exception raised by
the user's code is not wrapped in one: it keeps its type and gets a note
(:func:`add_training_context`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import types
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import traceback


class BzError(Exception):
    """Base of the errors bz reports as one line, without a traceback."""

    exit_code: int = 1


class UsageError(BzError):
    """Bad input: configuration, command line, ``train.py`` or a plugin package (exit 2)."""

    exit_code = 2


class MetricInputError(UsageError, ValueError):
    """What a batch hands a metric does not fit it (shapes, dtypes, the class count): bad
    input, exit 2. Still a ``ValueError``, so ``except ValueError`` around ``fit`` catches
    it as before."""


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
    position = f"epoch {epoch}, step {step}"
    exc.add_note(f"bz: training failed at {position} ({where})")
    # The CLI's one-line rendering reads the position back; a note is text for people.
    with contextlib.suppress(AttributeError):  # an exception type that refuses attributes
        setattr(exc, _CONTEXT_ATTRIBUTE, position)


def training_position(exc: BaseException) -> str | None:
    """``epoch E, step S`` where training failed, when bz attached it to ``exc``."""
    position = getattr(exc, _CONTEXT_ATTRIBUTE, None)
    return position if isinstance(position, str) else None


_VALIDATION_ATTRIBUTE = "_bz_validation_batch"


def add_validation_context(exc: BaseException, *, batch: int) -> None:
    """Attach the validation batch (its index in ``val_loader``, from 0) whose loading or
    computing raised ``exc`` (``bz validate``), without changing its type."""
    exc.add_note(f"bz: validation failed at batch index {batch} of val_loader")
    with contextlib.suppress(AttributeError):  # an exception type that refuses attributes
        setattr(exc, _VALIDATION_ATTRIBUTE, batch)


def validation_batch(exc: BaseException) -> int | None:
    """The validation batch index :func:`add_validation_context` attached, if any."""
    batch = getattr(exc, _VALIDATION_ATTRIBUTE, None)
    return batch if isinstance(batch, int) else None


def training_context(exc: BaseException) -> str | None:
    """``training failed at epoch E, step S`` when bz attached it to ``exc``, else None;
    ``validation failed at epoch E, step S, batch index B of val_loader`` for a failure
    in the validation the run does each epoch (or every ``validate_every_steps``)."""
    position = training_position(exc)
    if position is None:
        return None
    batch = validation_batch(exc)
    if batch is not None:
        return f"validation failed at {position}, batch index {batch} of val_loader"
    return f"training failed at {position}"


def describe_exception(exc: BaseException) -> str:
    """``ExceptionType: message`` (the message may be empty): a failure in one line.

    An exception whose ``__str__`` itself raises (a plugin's, say) is described as
    Python's tracebacks describe it, never by raising again from the error path."""
    try:
        message = str(exc)
    except KeyboardInterrupt:
        raise
    except BaseException:  # whatever a hostile __str__ raises
        message = "<exception str() failed>"
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


# -- where in the user's code -----------------------------------------------------------------


def user_frame(exc: BaseException, path: Path | None = None) -> str:
    """``file:line: Type: message``: ``exc`` and the innermost frame of the user's own
    code it passed through.

    The user's code is every file that is not part of bz, of Python's standard library
    or of an installed distribution (site-packages): ``train.py``, the modules beside
    it, a package of the project's installed in editable mode. A shape mismatch raised
    inside ``nn.Linear`` is reported at the line of the user's model that called it,
    with torch's message. ``path`` (``train.py``) counts as the user's wherever it lies.
    With no frame of the user's, the innermost frame is named.
    """
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    own = str(path.resolve()) if path is not None else None
    chosen = None
    for frame in frames:
        if _is_users(frame.filename, own):
            chosen = frame
    if chosen is None and frames:
        chosen = frames[-1]
    location = f"{chosen.filename}:{chosen.lineno}: " if chosen else ""
    return f"{location}{describe_exception(exc)}"


def package_frame(exc: BaseException, module: str) -> str:
    """``file:line: ``: the innermost frame ``exc`` passed through in the files of
    ``module``'s top-level package (a plugin's, wherever it is installed), or "".

    The import of a plugin's module goes through importlib's frames and may end in a
    library's (torch's, say); the line of the plugin's own that led there is the one its
    author needs.
    """
    import traceback

    return package_line(traceback.extract_tb(exc.__traceback__), module)


def package_line(frames: Iterable[traceback.FrameSummary], module: str) -> str:
    """``file:line: ``: the innermost of ``frames`` (outermost first, as
    ``traceback.extract_stack`` lists a running thread's) in the files of ``module``'s
    top-level package, or "" (see :func:`package_frame`)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(module.partition(".")[0])
    except (ImportError, ValueError):  # not importable at all: no file of its own
        return ""
    if spec is None:
        return ""
    folders = tuple(_folder(path) for path in spec.submodule_search_locations or ())
    single = _resolved(spec.origin) if spec.origin and not folders else None
    chosen = None
    for frame in frames:
        resolved = _resolved(frame.filename)
        if resolved == single or (folders and resolved.startswith(folders)):
            chosen = frame
    return f"{chosen.filename}:{chosen.lineno}: " if chosen is not None else ""


def defined_at(definition: object) -> str:
    """`` (at file:line)``: where a plugin's function, method or class is defined, or ""
    when Python cannot tell.

    A problem the loader finds by looking at a plugin (a hook's signature, a misspelled
    hook, a bad default) is raised from bz's own code, so its traceback holds no line of
    the plugin's: the message names the line instead.
    """
    place = definition_place(definition)
    return f" (at {place})" if place else ""


def definition_place(definition: object) -> str:
    """``file:line`` where a function, method or class is defined, or "" (see
    :func:`defined_at`)."""
    import inspect

    target: object = getattr(definition, "__func__", definition)  # bound, static, class
    if callable(target):
        with contextlib.suppress(ValueError):  # a __wrapped__ cycle
            target = inspect.unwrap(target)
    code = getattr(target, "__code__", None)
    if isinstance(code, types.CodeType):
        return f"{code.co_filename}:{code.co_firstlineno}"
    if not isinstance(target, type):
        return ""
    try:
        file = inspect.getsourcefile(target)
        line = inspect.getsourcelines(target)[1]
    except (OSError, TypeError):  # defined in a REPL, in C, or the file is gone
        return ""
    return f"{file}:{line}" if file else ""


def _is_users(filename: str, own: str | None) -> bool:
    if filename.startswith("<"):  # <frozen importlib._bootstrap>, <string>: no file to open
        return False
    resolved = _resolved(filename)
    if resolved == own:
        return True
    return not resolved.startswith(_library_folders())


@functools.lru_cache(maxsize=1024)
def _resolved(filename: str) -> str:
    return os.path.realpath(filename)


def _library_folders() -> tuple[str, ...]:
    """The folders whose files are not the user's: bz's package, the standard library,
    site-packages (each ending in a separator), and torch's wherever it lies."""
    torch = sys.modules.get("torch")
    torch_file = getattr(torch, "__file__", None)
    return _fixed_library_folders() + (
        (_folder(os.path.dirname(torch_file)),) if isinstance(torch_file, str) else ()
    )


@functools.cache
def _fixed_library_folders() -> tuple[str, ...]:
    import site
    import sysconfig

    paths = sysconfig.get_paths()
    folders = {
        paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths
    }
    with contextlib.suppress(AttributeError):  # some embedded interpreters lack them
        folders.update(site.getsitepackages())
        folders.add(site.getusersitepackages())
    folders.add(os.path.dirname(__file__))  # bz's own package
    return tuple(sorted({_folder(folder) for folder in folders if folder}))


def _folder(folder: str) -> str:
    return os.path.join(os.path.realpath(folder), "")

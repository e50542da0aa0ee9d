"""Start-up: the command line and ``import bz`` stay cheap, silent and unconfigured.

``bz --help`` and ``bz list-plugins`` answer without importing torch (which takes
seconds to import), and importing bz prints nothing and leaves logging to the
application. Each check runs in a fresh interpreter, so nothing this test process has
imported already can hide an import.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

# `import time:  self | cumulative | module` lines of -X importtime (nested names indented).
_IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)\s*$")


def _python(code: str, *, importtime: bool = False) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("BZ_")}
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run(
        [sys.executable, *flags, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def _imported(stderr: str) -> set[str]:
    matches = (_IMPORT_LINE.match(line) for line in stderr.splitlines())
    return {match.group(1) for match in matches if match}


def _torch_modules(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m == "torch" or m.startswith("torch."))


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["--version"], ["list-plugins"], ["train", "--help"]],
    ids=["help", "version", "list-plugins", "train-help"],
)
def test_cli_commands_that_train_nothing_do_not_import_torch(argv: list[str]) -> None:
    done = _python(
        f"from bz.commands import main; raise SystemExit(main({argv!r}))", importtime=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    imported = _imported(done.stderr)
    assert "bz.commands" in imported, "the import report is empty: is -X importtime working?"
    assert _torch_modules(imported) == []
    if argv == ["list-plugins"]:
        # Cheap, and still complete: the built-ins are listed from entry-point metadata.
        assert "console_out" in done.stdout
        assert "early_stopping" in done.stdout


@pytest.mark.parametrize(
    "module",
    ["bz", "bz.plugins", "bz.config", "bz.commands", "bz.plugins.console_out"],
)
def test_importing_bz_is_silent_unconfigured_and_torch_free(module: str) -> None:
    done = _python(
        f"""
        import json, logging, sys
        import {module}
        import structlog
        print(json.dumps({{
            "torch": "torch" in sys.modules,
            "structlog_configured": structlog.is_configured(),
            "root_handlers": len(logging.getLogger().handlers),
            "bz_handlers": len(logging.getLogger("bz").handlers),
            "root_level": logging.getLogger().level,
        }}))
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", "importing bz must print nothing"
    *printed_by_import, report_line = done.stdout.splitlines()
    assert printed_by_import == [], "importing bz must print nothing"
    report = json.loads(report_line)
    assert report == {
        "torch": False,
        "structlog_configured": False,
        "root_handlers": 0,
        "bz_handlers": 0,
        "root_level": 30,  # WARNING: the stdlib default, untouched
    }


@pytest.mark.slow  # bz train in its own process
def test_torch_arrives_only_when_training_does() -> None:
    done = _python(
        """
        import sys
        import bz
        before = "torch" in sys.modules
        bz.Trainer  # the lazy attribute imports the loop, and torch with it
        print(before, "torch" in sys.modules)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]


LISTING_IMPORTS = """
import atexit, sys

def report():
    print("imported torch:", "torch" in sys.modules, file=sys.stderr)
    print("plugin modules:", *sorted(m for m in sys.modules if m.startswith("bz.plugins.")),
          file=sys.stderr)

atexit.register(report)
from bz.commands import main
main()
"""


def test_verbose_listing_imports_every_plugin_and_still_not_torch() -> None:
    """A real ``bz list-plugins --verbose`` process: it imports each plugin's module to
    list its hooks and options (the built-ins' included), and none of them imports
    torch before the plugin is created."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("BZ_")}
    done = subprocess.run(
        [sys.executable, "-c", LISTING_IMPORTS, "list-plugins", "--verbose"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stderr.splitlines()
    (modules,) = [line.split()[2:] for line in lines if line.startswith("plugin modules:")]
    for builtin in ("ema", "early_stopping", "profiler", "tensorboard", "mlflow_logger"):
        assert f"bz.plugins.{builtin}" in modules, builtin
    assert "hooks:        start_training_session" in done.stdout
    assert "imported torch: False" in lines

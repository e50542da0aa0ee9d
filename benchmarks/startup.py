"""How long ``bz`` takes to start, against ``python -c "import torch"``.

::

    .venv/bin/python benchmarks/startup.py             # 10 alternating runs of each
    .venv/bin/python benchmarks/startup.py --runs 30 --json startup.json

Each command runs in a fresh process, the commands taking turns so that a busy
machine slows them alike; the median and the fastest wall time are reported. A
separate run of each with ``PYTHONPROFILEIMPORTTIME=1`` says whether it imported torch.

The two ``bz train --smoke`` rows train one batch of a tiny project (written to a
temporary folder, where every command runs): as ``bz train`` does, supervising a child
process that trains, and in one process (the command group called from Python, which
does not supervise). Their difference is what the supervisor adds to a run's start; the
supervised row's "imports torch" is its child's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

# `import time:  self | cumulative | module` lines of -X importtime (nested names indented).
_IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)\s*$")


def bz_command() -> list[str]:
    """The ``bz`` console script next to this interpreter, or ``python -m bz``."""
    script = shutil.which("bz", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "bz"]


def commands() -> dict[str, list[str]]:
    """What is timed, by the name it is reported under."""
    python, bz = sys.executable, bz_command()
    return {
        "python -c pass": [python, "-c", "pass"],
        'python -c "import torch"': [python, "-c", "import torch"],
        'python -c "import bz"': [python, "-c", "import bz"],
        "bz --help": [*bz, "--help"],
        "bz list-plugins": [*bz, "list-plugins"],
        "bz list-plugins --verbose": [*bz, "list-plugins", "--verbose"],
        "bz train --smoke (supervised)": [*bz, "train", "--smoke"],
        "bz train --smoke (one process)": [python, "-c", _IN_ONE_PROCESS, "train", "--smoke"],
    }


_IN_ONE_PROCESS = "import sys; from bz.commands import cli; cli.main(sys.argv[1:])"

_TRAIN_PY = """\
import torch
from torch import nn

import bz


def setup(config):
    model = nn.Linear(4, 2)
    data = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
    return bz.TrainingSetup(
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_loader=data,
        val_loader=data,
    )
"""


def write_project(folder: Path) -> None:
    """The tiny project the ``bz train --smoke`` rows train."""
    (folder / "train.py").write_text(_TRAIN_PY, encoding="utf-8")
    config = {"epochs": 1, "device": "cpu", "plugins": []}
    (folder / "bzconfig.json").write_text(json.dumps(config), encoding="utf-8")


def imported_modules(command: Sequence[str]) -> set[str]:
    """Every module ``command`` imports (from ``PYTHONPROFILEIMPORTTIME``'s report)."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    found = (_IMPORT_LINE.match(line) for line in done.stderr.splitlines())
    return {match.group(1) for match in found if match}


def imports_torch(command: Sequence[str]) -> bool:
    """Whether running ``command`` imports torch (or any part of it)."""
    return any(m == "torch" or m.startswith("torch.") for m in imported_modules(command))


def wall_time(command: Sequence[str]) -> float:
    """Seconds from start to exit of ``command`` (its output is discarded)."""
    started = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - started


def main(argv: Sequence[str] | None = None) -> int:
    """Time every command and print a Markdown table."""
    parser = argparse.ArgumentParser(description="Time bz's start-up against importing torch.")
    parser.add_argument("--runs", type=int, default=10, help="Timed runs of each command.")
    parser.add_argument("--json", dest="json_path", help="Also write the results here.")
    args = parser.parse_args(argv)

    json_path = str(Path(args.json_path).resolve()) if args.json_path else None
    with tempfile.TemporaryDirectory(prefix="bz-startup-") as folder:
        write_project(Path(folder))
        os.chdir(folder)
        return _measure(args.runs, json_path)


def _measure(runs: int, json_path: str | None) -> int:
    timed = commands()
    times: dict[str, list[float]] = {name: [] for name in timed}
    for command in timed.values():
        wall_time(command)  # warm the file cache; not counted
    for run in range(runs):
        names = list(timed)
        shift = run % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(wall_time(timed[name]))
    torch_imported = {name: imports_torch(command) for name, command in timed.items()}

    print(f"# start-up, median of {runs} alternating runs (wall time)")
    print()
    print("| command | median | fastest | imports torch |")
    print("|---|---:|---:|---|")
    for name in timed:
        print(
            f"| `{name}` | {statistics.median(times[name]) * 1e3:.0f} ms "
            f"| {min(times[name]) * 1e3:.0f} ms | {'yes' if torch_imported[name] else 'no'} |"
        )
    if json_path:
        with open(json_path, "w", encoding="utf-8") as out:
            json.dump({"times": times, "imports_torch": torch_imported}, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

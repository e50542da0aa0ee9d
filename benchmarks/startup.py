"""How long ``bz`` takes to start, against ``python -c "import torch"``.

::

    .venv/bin/python benchmarks/startup.py             # 10 alternating runs of each
    .venv/bin/python benchmarks/startup.py --runs 30 --json startup.json

Each command runs in a fresh process, the commands taking turns so that a busy
machine slows them alike; the median and the fastest wall time are reported. A
separate run of each with ``PYTHONPROFILEIMPORTTIME=1`` says whether it imported torch.
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
    }


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

    timed = commands()
    times: dict[str, list[float]] = {name: [] for name in timed}
    for command in timed.values():
        wall_time(command)  # warm the file cache; not counted
    for run in range(args.runs):
        names = list(timed)
        shift = run % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(wall_time(timed[name]))
    torch_imported = {name: imports_torch(command) for name, command in timed.items()}

    print(f"# start-up, median of {args.runs} alternating runs (wall time)")
    print()
    print("| command | median | fastest | imports torch |")
    print("|---|---:|---:|---|")
    for name in timed:
        print(
            f"| `{name}` | {statistics.median(times[name]) * 1e3:.0f} ms "
            f"| {min(times[name]) * 1e3:.0f} ms | {'yes' if torch_imported[name] else 'no'} |"
        )
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as out:
            json.dump({"times": times, "imports_torch": torch_imported}, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

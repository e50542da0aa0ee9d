"""Opt-in pytest plugin: CPU seconds per test file (``pytest -p tests._cpu_report``).

Wall time on a shared machine says more about the neighbours than about the tests; the
CPU time of the test process and of the processes it waited for (``bz`` subprocesses)
does not. Each test's CPU seconds go into ``$BZ_CPU_REPORT`` (default
``.pytest-cpu.jsonl``), one JSON line per test with its wall seconds; with xdist every
worker appends its own lines. ``python -m tests._cpu_report FILE`` prints per-file totals.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest


def _cpu() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    cpu, wall = _cpu(), time.monotonic()
    yield
    line = {
        "file": item.nodeid.split("::")[0],
        "test": item.nodeid,
        "cpu": round(_cpu() - cpu, 3),
        "wall": round(time.monotonic() - wall, 3),
        "slow": item.get_closest_marker("slow") is not None,
        "load": os.getloadavg()[0],
    }
    path = Path(os.environ.get("BZ_CPU_REPORT", ".pytest-cpu.jsonl"))
    with path.open("a", encoding="utf-8") as report:
        report.write(json.dumps(line) + "\n")


def main(path: str) -> None:
    """Per-file CPU and wall totals, the most CPU first."""
    cpu: dict[str, float] = defaultdict(float)
    wall: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = json.loads(raw)
        cpu[line["file"]] += line["cpu"]
        wall[line["file"]] += line["wall"]
        count[line["file"]] += 1
    for name in sorted(cpu, key=lambda key: -cpu[key]):
        print(f"{cpu[name]:8.1f} cpu {wall[name]:8.1f} wall {count[name]:4d} tests  {name}")
    print(f"{sum(cpu.values()):8.1f} cpu {sum(wall.values()):8.1f} wall  total")


if __name__ == "__main__":
    main(sys.argv[1])

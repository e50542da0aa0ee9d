"""Opt-in pytest plugin: CPU seconds per test file (``pytest -p tests._cpu_report``).

Wall time on a shared machine says more about the neighbours than about the tests; the
CPU time of the test process and of the processes it waited for (``bz`` subprocesses)
does not. Each test's CPU seconds go into ``$BZ_CPU_REPORT`` (default
``.pytest-cpu.jsonl``), one JSON line per test with its wall seconds; with xdist every
worker appends its own lines, with the worker's name and the test's start (epoch
seconds). ``python -m tests._cpu_report FILE`` prints per-file totals, then each worker's
last file and when it ended: a worker that ends minutes after the other ran a long file
alone at the end (``pytest -n 2 --dist loadfile``), and that file should start earlier.
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
    cpu, wall, start = _cpu(), time.monotonic(), time.time()
    yield
    line = {
        "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
        "start": round(start, 3),
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
    _tails([json.loads(raw) for raw in Path(path).read_text(encoding="utf-8").splitlines()])


def _tails(lines: list[dict[str, object]]) -> None:
    """Per worker: when its last test ended (seconds from the first start) and its file."""
    timed = [line for line in lines if "start" in line]  # reports written before "start"
    if not timed:
        return
    first = min(float(str(line["start"])) for line in timed)
    ends: dict[str, tuple[float, str]] = {}
    for line in timed:
        end = float(str(line["start"])) + float(str(line["wall"])) - first
        worker = str(line["worker"])
        if end >= ends.get(worker, (-1.0, ""))[0]:
            ends[worker] = (end, str(line["file"]))
    for worker, (end, name) in sorted(ends.items()):
        print(f"{worker}: last test ended at {end:8.1f} s, in {name}")


if __name__ == "__main__":
    main(sys.argv[1])

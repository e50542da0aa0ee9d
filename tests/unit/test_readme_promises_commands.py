"""The README's set-up and benchmark commands take the arguments it shows them with.

README ("Set-up"): both make targets install torch pinned at the version it names, and
``make demo TORCH=...`` chooses another (the Makefile's ``TORCH ?=``). README
("Performance"): every ``benchmarks/run.py`` command line it shows parses with the
script's own parser (in process, nothing runs), ``benchmarks/gpu.sh --dry-run`` is the
GPU script's flag, and the flags shown for the other scripts are theirs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PERFORMANCE = README.split("\n## Performance\n", 1)[1].split("\n## ", 1)[0]


def test_the_pinned_torch_is_the_makefiles() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    pinned = re.search(r"^TORCH\s*\?=\s*(\S+)$", makefile, re.MULTILINE)
    assert pinned is not None
    assert f"pinned (`{pinned[1]}`)" in README
    assert 'make demo TORCH="torch==' in README


def _run_py_command_lines() -> list[list[str]]:
    """The arguments README shows ``benchmarks/run.py`` with: each line naming it (with
    the flags its comment names), and a command in backticks continued on the next line."""
    lines = PERFORMANCE.splitlines()
    found = []
    for i, line in enumerate(lines):
        if "benchmarks/run.py" not in line:
            continue
        text = line.split("benchmarks/run.py", 1)[1]
        if text.count("`") == 0 and line.count("`") % 2 == 1:  # the command goes on
            text += " " + lines[i + 1].split("`", 1)[0]
        words = text.split("`", 1)[0].replace("#", " ").replace(",", " ").split()
        kept: list[str] = []
        for word in words:
            if (
                word.startswith("--")
                or word.isdigit()
                or word == "tiny"
                or kept[-1:] == ["--only"]
            ):
                kept.append(word)
        found.append(kept)
    return found


def test_every_run_py_command_line_parses() -> None:
    from benchmarks.loop.cli import parse

    lines = _run_py_command_lines()
    flags = {flag for line in lines for flag in line if flag.startswith("--")}
    assert {"--instructions", "--quick", "--profile", "--workload", "--jobs"} <= flags
    for argv in lines:
        parse(argv)  # argparse exits 2 on an option it does not know
    parse(["--layouts", "3"])  # "`--layouts 3` shows that spread"
    assert "`--layouts 3`" in PERFORMANCE


def test_gpu_sh_has_its_dry_run() -> None:
    from benchmarks.gpu import parse

    assert "benchmarks/gpu.sh" in PERFORMANCE
    assert "(--dry-run: CPU smoke)" in PERFORMANCE
    assert parse(["--dry-run"]).dry_run
    assert "gpu.py" in (ROOT / "benchmarks" / "gpu.sh").read_text(encoding="utf-8")


@pytest.mark.parametrize("script", ["distributed.py", "startup.py", "rounds.py"])
def test_the_other_scripts_flags_are_theirs(script: str) -> None:
    source = (ROOT / "benchmarks" / script).read_text(encoding="utf-8")
    shown = set()
    for line in PERFORMANCE.splitlines():
        if f"benchmarks/{script}" in line:
            shown |= set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", line.split("#")[0]))
    for flag in shown:
        assert f'"{flag}"' in source, flag


def _documents() -> list[Path]:
    return [ROOT / "README.md", ROOT / "DEVELOPERS.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_file_the_documents_point_to_exists() -> None:
    # "what a test checks (tests/unit/test_rewind.py, ...)", the examples, the scripts:
    # a file moved or renamed must take the documents' references with it.
    named = set()
    for document in _documents():
        text = document.read_text(encoding="utf-8")
        named |= set(re.findall(r"(?<![\w/.])((?:tests|examples|benchmarks)/[\w/.-]*\w)", text))
        named |= {f"tests/{p}" for p in re.findall(r"`((?:unit|integration)/test_\w+\.py)", text)}
    assert len(named) > 20
    assert sorted(path for path in named if not (ROOT / path).exists()) == []

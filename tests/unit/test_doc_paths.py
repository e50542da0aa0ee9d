"""Every page bz's own text points a user to exists: what `bz config-schema` and other
messages name (``docs/....md``), and every relative link of the README and the docs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_docs_path_bz_names_in_its_messages_exists() -> None:
    named = {
        (path.relative_to(ROOT), match.group(0).rstrip("."))
        for path in sorted((ROOT / "src" / "bz").rglob("*.py"))
        for match in re.finditer(r"\b(?:docs|examples)/[\w./-]+", path.read_text())
    }
    assert named  # the scan finds what it looks for
    assert [(str(where), page) for where, page in named if not (ROOT / page).exists()] == []


def test_every_relative_link_of_the_readme_and_docs_exists() -> None:
    pages = [ROOT / "README.md", ROOT / "DEVELOPERS.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = [
        (page.name, target)
        for page in pages
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
        if "://" not in target and not (page.parent / target).exists()
    ]
    assert broken == []

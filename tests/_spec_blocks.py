"""Read the fenced code blocks of the public plugin guide.

The guide is copied into the project (``tests/spec/custom-plugin-README.md``) so that
tests never depend on anything outside the repository. Its code blocks are tests: the
spec tests execute the Python ones, and the plugin-package tests install the package
exactly as the ``toml`` and ``python`` blocks write it.
"""

from __future__ import annotations

import re
from pathlib import Path

SPEC_PATH = Path(__file__).parent / "spec" / "custom-plugin-README.md"

# A fence opens with ``` and an optional info string, and closes with a bare ```.
# The guide never nests fences, so a non-greedy match up to the next closing fence
# is exact.
_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def code_blocks(language: str | None = None) -> list[str]:
    """Return the guide's fenced code blocks, in document order.

    ``language`` keeps only blocks whose info string's first word equals it
    (``"python"``, ``"toml"``, ``"json"``, ``"bash"``); ``""`` selects blocks with no
    language; ``None`` returns every block. Each block's text ends with a newline.
    """
    text = SPEC_PATH.read_text(encoding="utf-8")
    blocks: list[str] = []
    for match in _FENCE.finditer(text):
        info = match.group(1).strip()
        block_language = info.split()[0] if info else ""
        if language is None or block_language == language:
            blocks.append(match.group(2))
    return blocks


def block_starting_with(first_line: str, language: str | None = None) -> str:
    """Return the one block whose first line is ``first_line`` (stripped).

    The guide labels file contents with a comment on the first line
    (``# src/my_bz_plugin/my_plugin.py``); this finds such a block and fails loudly
    if the guide changed so that it no longer exists or is ambiguous.
    """
    matches = [
        block
        for block in code_blocks(language)
        if block.splitlines() and block.splitlines()[0].strip() == first_line
    ]
    if len(matches) != 1:
        raise LookupError(
            f"expected exactly one {language or 'code'} block starting with "
            f"{first_line!r} in {SPEC_PATH.name}, found {len(matches)}"
        )
    return matches[0]

"""``--set KEY=VALUE``: VALUE is JSON, or a bare string; a list or table that is not JSON
is named as such instead of being taken for a string."""

from __future__ import annotations

import click
import pytest

from bz.commands.options import parse_assignment


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("device=cpu", ("device", "cpu")),
        ("epochs=3", ("epochs", 3)),
        ('plugins=["console_out"]', ("plugins", ["console_out"])),
        ("hyperparameters.name=x]", ("hyperparameters.name", "x]")),
    ],
)
def test_json_or_a_bare_string(text: str, expected: tuple[str, object]) -> None:
    assert parse_assignment(text) == expected


@pytest.mark.parametrize(
    "text",
    ['plugins=["console_out",]', 'gradient_clip={"max_norm": 1,}', "metrics=['accuracy']"],
)
def test_a_list_or_table_that_is_not_json_is_named_where_it_breaks(text: str) -> None:
    # Taken for a string, it came back as `plugins: expected a list, got "[...]"`.
    key = text.partition("=")[0]
    with pytest.raises(click.BadParameter, match=rf"^{key}: invalid JSON at column \d+: "):
        parse_assignment(text)

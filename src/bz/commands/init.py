"""``bz init``: write a project that trains offline as it is."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import click

from bz._errors import UsageError

TEMPLATE_FILES = ("train.py", "bzconfig.json")


def write_project(directory: Path, *, overwrite: bool = False) -> list[Path]:
    """Copy the template into ``directory``; refuse to overwrite unless asked."""
    targets = [directory / name for name in TEMPLATE_FILES]
    existing = [str(path) for path in targets if path.exists()]
    if existing and not overwrite:
        raise UsageError(f"{', '.join(existing)} already exist(s); use --force to overwrite")
    template = resources.files("bz.commands._project_template")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for name, target in zip(TEMPLATE_FILES, targets, strict=True):
            text = template.joinpath(name).read_text(encoding="utf-8")
            target.write_text(text, encoding="utf-8")
    except OSError as exc:  # a read-only place, a file where the folder should be
        where = exc.filename or directory
        raise UsageError(f"{where}: cannot write the project: {exc.strerror}") from None
    return targets


@click.command()
@click.argument("directory", default=".", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Overwrite existing files.")
def init(directory: str, force: bool) -> None:
    """Write a runnable project (train.py, bzconfig.json) into DIRECTORY."""
    written = write_project(Path(directory), overwrite=force)
    for path in written:
        click.echo(f"wrote {path}")
    where = "" if Path(directory) == Path(".") else f"cd {directory} && "
    click.echo(f"next: {where}bz train")

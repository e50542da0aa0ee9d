"""The counted process's view of the checkout: links of one name length from anywhere.

Where the checkout lies shows up in a process as strings; their lengths move the heap's
layout, and the layout moves instruction counts (see ``benchmarks.loop.instructions``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import sysconfig
import tempfile
from pathlib import Path

KEPT_ENVIRONMENT = ("HOME", "LANG", "LC_ALL", "TMPDIR", "USER")
"""What the child keeps of the environment: none of it names the checkout."""


def isolated(folder: Path, valgrind_path: str) -> tuple[str, dict[str, str], str]:
    """The interpreter, environment and working directory of a child that sees the
    checkout and its Python environment only through links in ``folder``.

    Where the checkout lies shows up in a process as strings (``sys.path``, every
    module's ``__file__``, ``PWD``, ``PATH``, an editable install's ``.pth`` entry);
    their lengths move the heap's layout, and the layout moves the counts (the
    allocator's and the hash tables' work follows addresses). ``folder`` is a fresh
    temporary folder whose name has the same length in every run; the child runs with
    ``-S`` (no ``site``, so no ``.pth`` file adds a real path) and finds the checkout,
    its ``src`` and the environment's packages through links there, with a fixed
    environment, ``folder`` as working directory and its modules compiled for the links'
    paths (``PYTHONPYCACHEPREFIX``), so its strings have the same lengths wherever the
    checkout lies.
    """
    real_root = Path(__file__).resolve().parents[2]
    folder.mkdir(parents=True, exist_ok=True)
    root = _link(folder / "root", real_root)
    prefix = _link(folder / "prefix", Path(sys.prefix).resolve())
    python = _through(Path(sys.executable).absolute(), Path(sys.prefix), prefix)
    packages = dict.fromkeys(
        _through(Path(sysconfig.get_paths()[kind]), Path(sys.prefix), prefix)
        for kind in ("purelib", "platlib")
    )
    paths = [str(root / "src")] if (real_root / "src").is_dir() else []
    paths += [str(root), *packages]
    env = {name: os.environ[name] for name in KEPT_ENVIRONMENT if name in os.environ}
    env.update(
        PATH=os.pathsep.join(dict.fromkeys([str(Path(valgrind_path).parent), "/usr/bin", "/bin"])),
        PYTHONPATH=os.pathsep.join(paths),
        PYTHONHASHSEED="0",
        # Compiled modules from here, compiled for the links' paths: a module compiled
        # elsewhere carries the real path (co_filename) in its marshalled strings.
        PYTHONPYCACHEPREFIX=str(folder / "pycache"),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )
    # The working directory is the folder itself: a link as working directory would be
    # resolved (os.getcwd(), sys.path[0] under -m) to the checkout's real path.
    return python, env, str(folder)


def links_folder() -> Path:
    """The folder of links (``isolated``) of this checkout and Python environment: the
    same path, of the same length from every checkout, each time (so the compiled
    modules it keeps are reused), named after what the links point to."""
    real_root = Path(__file__).resolve().parents[2]
    key = f"{real_root}\0{Path(sys.prefix).resolve()}".encode()
    return Path(tempfile.gettempdir()) / f"bz-callgrind-{hashlib.sha256(key).hexdigest()[:12]}"


def _link(link: Path, target: Path) -> Path:
    """``link``, a symbolic link to ``target`` (made unless it is one already)."""
    with contextlib.suppress(FileExistsError):
        link.symlink_to(target, target_is_directory=True)
    if link.resolve() != target.resolve():
        raise RuntimeError(f"{link} points to {link.resolve()}, not {target}")
    return link


def _through(path: Path, folder: Path, link: Path) -> str:
    """``path``, reached through ``link`` (a link to ``folder``) where it lies inside it."""
    try:
        return str(link / path.relative_to(folder))
    except ValueError:
        return str(path)

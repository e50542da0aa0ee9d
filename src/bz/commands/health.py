"""``bz health``: versions and the devices torch can use."""

from __future__ import annotations

import json
from typing import Any

import click

from bz import __version__


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def health(as_json: bool) -> None:
    """Report versions and the devices torch can use."""
    import platform

    import torch

    from bz.training.device import resolve_device

    report: dict[str, Any] = {
        "bz": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "mps_available": torch.backends.mps.is_available(),
        "cpu_threads": torch.get_num_threads(),
        "auto_device": str(resolve_device("auto")),
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        click.echo(f"{key:<16} {value}")

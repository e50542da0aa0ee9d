"""What the README's table says `make demo` gives: the digits example's result.

README ("Set-up"): the digits example runs 15 of its 30 epochs (early stopping, the best
weights restored) and the table gives its validation accuracy. The run is seeded and on
the CPU, so these are exact: epochs run, the epoch whose weights are restored (the one
with the lowest validation loss, however small its lead: README, `early_stopping`), and
its validation accuracy. The example is trained as `make demo` trains it
(`examples/digits/bzconfig.json` through `bz.run`, as `bz train` does), with its
checkpoints in a temporary folder and console_out off.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import bz

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "digits"
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _demo_row() -> str:
    return next(line for line in README.splitlines() if line.startswith("| `examples/digits`"))


@pytest.mark.slow  # 345 steps and scikit-learn's import: seconds, not a quick test
def test_the_digits_example_ends_as_the_readme_table_says(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    data = json.loads((EXAMPLE / "bzconfig.json").read_text(encoding="utf-8"))
    data["plugins"] = [p for p in data["plugins"] if p != "console_out"]
    config = bz.config.structure({**data, "checkpoint_dir": str(tmp_path)}, bz.RunConfig)
    result = bz.run(config, base_dir=EXAMPLE)
    epochs = re.search(r"(\d+) of (\d+) \(early stop", _demo_row())
    assert epochs is not None
    assert (result.epochs_completed, config.epochs) == (int(epochs[1]), int(epochs[2]))
    assert result.stopped_early

    losses = [record.validation_loss for record in result.history]
    best = min(range(len(losses)), key=lambda i: (losses[i], i))  # earliest of equal ones
    restored = re.search(r"epoch (\d+)'s weights restored", _demo_row())
    assert restored is not None
    assert best + 1 == int(restored[1])

    accuracy = re.search(r"\| ([0-9.]+) \(the restored epoch", _demo_row())
    assert accuracy is not None
    got = result.history[best].validation_metrics["accuracy"]
    assert f"{got:.3f}" == accuracy[1]
    assert result.model is not None

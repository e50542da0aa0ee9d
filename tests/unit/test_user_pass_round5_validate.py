"""``bz validate --checkpoint`` given another project's checkpoint.

The one line ended at torch's heading, ``Error(s) in loading state_dict for Linear:``,
and dropped what did not fit; it now names the first mismatch and how many more.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from tests._support import linear_train_py

from bz.commands import cli


def _project(folder: Path, train_py: str) -> Path:
    folder.mkdir()
    (folder / "train.py").write_text(train_py, encoding="utf-8")
    config = {"epochs": 1, "device": "cpu", "plugins": []}
    (folder / "bzconfig.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_a_checkpoint_of_another_model_names_what_does_not_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BZ_CONFIG", raising=False)
    other = _project(tmp_path / "other", linear_train_py(16))
    monkeypatch.chdir(other)
    trained = CliRunner().invoke(cli, ["train"])
    assert trained.exit_code == 0, trained.output
    (model_pt,) = (other / ".bz" / "checkpoints").glob("*/model.pt")

    wider = linear_train_py(16).replace("nn.Linear(3, 2)", "nn.Linear(3, 5)")
    monkeypatch.chdir(_project(tmp_path / "mine", wider))
    result = CliRunner().invoke(cli, ["validate", "--checkpoint", str(model_pt)])
    assert result.exit_code == 2
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("bz: error:")]
    assert error.startswith(f"bz: error: {model_pt}: does not fit the model train.py builds: ")
    assert "size mismatch for weight: copying a param with shape torch.Size([2, 3])" in error
    assert error.endswith("(and 1 more)")  # the bias

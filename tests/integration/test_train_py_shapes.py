"""A ``train.py`` that ends the process or has the wrong ``setup`` is reported, in one line.

``sys.exit()`` anywhere in the user's code (at import, in ``setup``, in the model's
forward) is not a finished run, whatever code it names: ``bz train`` exits 1 and says
where, instead of passing the code on (``sys.exit(0)`` used to make ``bz train`` exit 0
with no word, a run reported as a success that trained nothing). In training, it and
every other exception that is not an ``Exception`` are named like an error: the epoch,
the step, the user's file and line. An error raised inside torch (a shape mismatch in
``nn.Linear``) names the line of the user's code that called it, with torch's message.
A ``setup`` that cannot take the config is a problem with the file: exit 2, naming the
file and line, before anything runs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from tests._fault_support import no_rendering
from tests._support import TINY_TRAIN_PY, run_bz

from bz import _logging
from bz.commands import cli

_EXIT_IN_FORWARD = TINY_TRAIN_PY.replace(
    "model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))",
    "model = Quitter()",
).replace(
    "import bz\n",
    "import bz\n\n\n"
    "class Quitter(nn.Linear):\n"
    "    def __init__(self) -> None:\n"
    "        super().__init__(4, 2)\n\n"
    "    def forward(self, x: torch.Tensor) -> torch.Tensor:\n"
    "        raise SystemExit(0)\n",
)

_EXITS = {
    "at_import": (
        TINY_TRAIN_PY + "\nimport sys\nsys.exit(0)\n",
        r"called sys\.exit\(\) while importing",
    ),
    "in_setup": (
        TINY_TRAIN_PY.replace(
            "    generator = torch", "    raise SystemExit(0)\n    generator = torch"
        ),
        r"setup called sys\.exit\(\)",
    ),
    "in_forward": (
        _EXIT_IN_FORWARD,
        r"SystemExit: 0 \(sys\.exit\(\) in your code; training did not finish\)",
    ),
}


_RAISES_LATER = TINY_TRAIN_PY.replace(
    "model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))",
    "model = Raiser()",
).replace(
    "import bz\n",
    "import bz\n\n\n"
    "class Custom(BaseException):\n"
    "    pass\n\n\n"
    "class Raiser(nn.Module):\n"
    "    def __init__(self) -> None:\n"
    "        super().__init__()\n"
    "        self.first = nn.Linear(4, 8)\n"
    "        self.last = nn.Linear(8, 2)\n"
    "        self.wrong = nn.Linear(5, 2)\n"
    "        self.steps = 0\n\n"
    "    def forward(self, x: torch.Tensor) -> torch.Tensor:\n"
    "        self.steps += self.training\n"
    "        hidden = self.first(x)\n"
    "        if self.steps == 6:  # epoch 2 (4 batches an epoch), step 5\n"
    "            RAISE\n"
    "        return self.last(hidden)\n",
)
"""A model that raises in its forward at epoch 2, step 5 (``RAISE``: the statement)."""

_LATER = {
    # (statement, exit code, what the line says after the file and line)
    "sys_exit_0": (
        "raise SystemExit(0)",
        1,
        r"SystemExit: 0 \(sys\.exit\(\) in your code; training did not finish\)",
    ),
    "a_base_exception": (
        "raise Custom('mine')",
        1,
        r"Custom: mine \(a BaseException, not an Exception; training did not finish\)",
    ),
    "an_error": ("raise ValueError('bad')", 1, r"ValueError: bad"),
    # Inside torch's own module: the line that called it, torch's message.
    "a_shape_mismatch_in_torch": (
        "return self.wrong(hidden)",
        1,
        r"RuntimeError: mat1 and mat2 shapes cannot be multiplied \(16x8 and 5x2\)",
    ),
}


def _project(folder: Path, train_py: str, epochs: int = 1) -> Path:
    (folder / "train.py").write_text(train_py, encoding="utf-8")
    config = folder / "bzconfig.json"
    settings = {"epochs": epochs, "device": "cpu", "plugins": []}
    config.write_text(json.dumps(settings), encoding="utf-8")
    return config


def _bz(*args: str) -> Result:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_logging, "configure", no_rendering)
        return CliRunner().invoke(cli, list(args))


def _one_error_line(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize("where", sorted(_EXITS))
def test_sys_exit_0_in_the_users_code_is_a_failed_run(where: str, tmp_path: Path) -> None:
    train_py, message = _EXITS[where]
    config = _project(tmp_path, train_py)
    result = _bz("train", "--config", str(config))
    assert result.exit_code == 1, result.output
    line = _one_error_line(result)
    assert line.startswith("bz: error: "), line
    assert "train.py:" in line, line
    assert re.search(message, line), line


@pytest.mark.parametrize("statement", ["raise SystemExit(0)", "raise Custom('mine')"])
def test_sys_exit_0_in_the_forward_fails_bz_train_in_its_own_process(
    statement: str, tmp_path: Path
) -> None:
    # The command line as users run it: supervised, the code reaching the supervisor. A
    # BaseException of the user's own used to leave a traceback and the supervisor's
    # "exited with code 1 without finishing".
    _project(tmp_path, _RAISES_LATER.replace("RAISE", statement), epochs=2)
    done = run_bz(tmp_path, "train", "--log-format", "json")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("bz: error: training failed at epoch 2, step 5: "), line
    assert line.endswith("training did not finish)"), line
    (exit_event,) = [e for e in map(json.loads, done.stdout.splitlines()) if e["event"] == "exit"]
    assert exit_event["exit_code"] == 1
    assert not list(tmp_path.glob(".bz/checkpoints/*/model.pt"))


@pytest.mark.parametrize("case", sorted(_LATER))
def test_what_the_users_forward_raises_names_the_epoch_step_and_its_line(
    case: str, tmp_path: Path
) -> None:
    statement, code, message = _LATER[case]
    train_py = _RAISES_LATER.replace("RAISE", statement)
    line_number = train_py.splitlines().index(f"            {statement}") + 1
    config = _project(tmp_path, train_py, epochs=2)
    result = _bz("train", "--config", str(config))
    assert result.exit_code == code, result.output
    line = _one_error_line(result)
    assert re.fullmatch(
        rf"bz: error: training failed at epoch 2, step 5: \S*train\.py:{line_number}: {message}",
        line,
    ), line


def test_a_keyboard_interrupt_the_code_raises_is_ctrl_c_s_code_and_says_where(
    tmp_path: Path,
) -> None:
    train_py = _RAISES_LATER.replace("RAISE", "raise KeyboardInterrupt")
    line_number = train_py.splitlines().index("            raise KeyboardInterrupt") + 1
    config = _project(tmp_path, train_py, epochs=2)
    result = _bz("train", "--config", str(config))
    assert result.exit_code == 130, result.output
    line = _one_error_line(result)
    assert re.fullmatch(
        rf"bz: interrupted at epoch 2, step 5: \S*train\.py:{line_number}: KeyboardInterrupt "
        r"\(raised in your code, not by a signal\)",
        line,
    ), line


def test_an_error_in_a_module_beside_train_py_names_that_module(tmp_path: Path) -> None:
    # The user's code is not only train.py: its neighbours are the user's too.
    (tmp_path / "shapes.py").write_text(
        "import torch\nfrom torch import nn\n\n\n"
        "def project(x: torch.Tensor) -> torch.Tensor:\n"
        "    return nn.Linear(3, 2)(x)\n",
        encoding="utf-8",
    )
    train_py = _RAISES_LATER.replace("RAISE", "return shapes.project(hidden)").replace(
        "import bz\n", "import bz\nimport shapes\n", 1
    )
    config = _project(tmp_path, train_py, epochs=2)
    result = _bz("train", "--config", str(config))
    assert result.exit_code == 1, result.output
    line = _one_error_line(result)
    assert re.fullmatch(
        r"bz: error: training failed at epoch 2, step 5: \S*shapes\.py:6: RuntimeError: "
        r"mat1 and mat2 shapes cannot be multiplied \(16x8 and 3x2\)",
        line,
    ), line


@pytest.mark.parametrize(
    ("definition", "shown"),
    [("def setup():", r"setup\(\)"), ("def setup(*, config):", r"setup\(\*, config\)")],
)
def test_a_setup_that_cannot_take_the_config_is_one_line_and_exit_2(
    definition: str, shown: str, tmp_path: Path
) -> None:
    train_py = TINY_TRAIN_PY.replace(
        "def setup(config: bz.RunConfig) -> bz.TrainingSetup:", definition
    )
    config = _project(tmp_path, train_py)
    result = _bz("check-config", "--config", str(config))
    assert result.exit_code == 0, result.output  # check-config does not import train.py
    result = _bz("train", "--config", str(config))
    assert result.exit_code == 2, result.output
    line = _one_error_line(result)
    line_number = train_py.splitlines().index(definition) + 1
    assert re.fullmatch(
        rf"bz: error: .*train\.py:{line_number}: {shown} must take one argument, the run's "
        r"config \(`def setup\(config: bz\.RunConfig\) -> bz\.TrainingSetup`\)",
        line,
    ), line


_NO_MISTAKES = {
    # Parameters beyond the config, with defaults: bz passes the config alone.
    "setup_defaults_beyond_the_config": (
        "def setup(config: bz.RunConfig) -> bz.TrainingSetup:",
        "def setup(config: bz.RunConfig, width: int = 8) -> bz.TrainingSetup:",
    ),
    # Fine-tuning the last layer only is no mistake.
    "an_optimizer_over_part_of_the_model": (
        "optimizer=torch.optim.SGD(model.parameters(), lr=0.1),",
        "optimizer=torch.optim.SGD(model[2].parameters(), lr=0.1),",
    ),
}


@pytest.mark.parametrize("case", sorted(_NO_MISTAKES))
def test_a_setup_close_to_a_mistake_still_trains(case: str, tmp_path: Path) -> None:
    good, other = _NO_MISTAKES[case]
    assert good in TINY_TRAIN_PY
    config = _project(tmp_path, TINY_TRAIN_PY.replace(good, other))
    result = _bz("train", "--config", str(config))
    assert result.exit_code == 0, result.output


_SETUP_MISTAKES = {
    # Failed inside bz (position.py: TypeError: 'NoneType' object is not iterable), exit 1.
    "no_train_loader": (
        "train_loader=DataLoader(data, batch_size=16, shuffle=True),",
        "train_loader=None,",
        r"TrainingSetup: train_loader is required, got None",
    ),
    # Trained "successfully" with weights that never changed.
    "an_optimizer_of_another_model": (
        "optimizer=torch.optim.SGD(model.parameters(), lr=0.1),",
        "optimizer=torch.optim.SGD(nn.Linear(4, 2).parameters(), lr=0.1),",
        r"TrainingSetup: the optimizer holds none of the model's parameters \(2 others\)",
    ),
}


@pytest.mark.parametrize("case", sorted(_SETUP_MISTAKES))
def test_a_setup_mistake_is_one_line_naming_the_line_and_exit_2(case: str, tmp_path: Path) -> None:
    good, bad, message = _SETUP_MISTAKES[case]
    assert good in TINY_TRAIN_PY
    train_py = TINY_TRAIN_PY.replace(good, bad)
    config = _project(tmp_path, train_py)
    result = _bz("train", "--config", str(config))
    assert result.exit_code == 2, result.output
    line = _one_error_line(result)
    assert re.search(rf"train\.py:\d+: {message}", line), line
    assert not list(tmp_path.glob(".bz/checkpoints/*/*.pt"))

"""Helpers for the checkpoint and fault-injection tests.

* :class:`FaultPlugin`: a plugin that fails where its options say (any hook, ``create``,
  config validation, ``state_dict`` / ``load_state_dict``), returns garbage from every
  hook, or scribbles over the context's counters.
* :func:`install_fake_distribution`: a folder with a ``*.dist-info`` whose entry points
  register ``faulty`` and ``broken_import`` (a module that raises when imported), so
  ``bz train`` discovers them exactly as it discovers installed packages.
* :func:`resume_setup` (and :data:`RESUME_TRAIN_PY`, a ``train.py`` using it): a setup
  that draws from every random generator a real run does; :func:`fit_resumable` trains
  it in this process as ``bz train`` would.
* :func:`child_main`: ``bz`` in the training process of the subprocesses the kill tests
  start (their entry is :data:`tests._child.FAULT_CHILD`); it arranges for the process
  to kill itself at a chosen step or inside a checkpoint write.
"""

from __future__ import annotations

import io
import os
import random
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NoReturn

import attrs
import numpy
import torch
from tests._support import weights
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bz
from bz.plugins import HOOK_NAMES, PluginContext

REPO_ROOT = Path(__file__).resolve().parent.parent


def jitter(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate, scaling the inputs by a factor drawn from Python's and NumPy's generators."""
    inputs = torch.stack([x for x, _ in batch])
    targets = torch.stack([y for _, y in batch])
    scale = 1.0 + 0.01 * random.random() + 0.01 * float(numpy.random.rand())
    return inputs * scale, targets


def fit_resumable(
    folder: Path | None, config: bz.RunConfig, plugins: list[Any] | None = None
) -> tuple[bz.FitResult, dict[str, torch.Tensor]]:
    """Train :func:`resume_setup` with checkpoints in ``folder``: the result and the final
    weights (copied). Seeded first, as ``bz train`` does before calling ``setup()``."""
    bz.seed_everything(5)
    setup = resume_setup(config)
    result = bz.Trainer().fit(setup, config, plugins or [], checkpoint_dir=folder)
    return result, weights(setup.model)


def resume_setup(config: bz.RunConfig) -> bz.TrainingSetup:
    """Six shuffled batches per epoch, dropout, Adam and a StepLR schedule.

    It draws from every random generator a real run does (the shuffle, dropout, and
    Python's and NumPy's generators in the collate function), so a resume that misses
    one of them cannot be bit-identical.
    """
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(48, 6, generator=generator)
    targets = (inputs[:, 0] + inputs[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))
    optimizer = torch.optim.Adam(
        model.parameters(), lr=float(config.hyperparameters.get("lr", 0.01))
    )
    data = TensorDataset(inputs, targets)
    return bz.TrainingSetup(
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9),
        train_loader=DataLoader(data, batch_size=8, shuffle=True, collate_fn=jitter),
        val_loader=DataLoader(data, batch_size=24),
    )


RESUME_TRAIN_PY = "from tests._fault_support import resume_setup as setup\n"
"""A ``train.py`` for :func:`resume_setup` (the repository root must be importable)."""

BATCHES_PER_EPOCH = 6

FAULT_DISTRIBUTION = "bz-fault-plugins"


# -- the fault plugin ------------------------------------------------------------------------


def _fail_in_config(_instance: object, _attribute: object, value: str) -> None:
    if value == "config":
        raise RuntimeError("injected fault in config validation")


@attrs.frozen
class FaultConfig:
    """Options of the ``faulty`` plugin."""

    fail_in: str = attrs.field(default="", validator=_fail_in_config)
    """A hook name, ``create``, ``config``, ``state_dict`` or ``load_state_dict``."""
    mode: Literal["raise", "garbage", "garbage_state", "mutate"] = "raise"
    """``raise`` in ``fail_in``; return ``garbage`` from every hook; return a state a
    checkpoint cannot hold (``garbage_state``); ``mutate`` the context's counters."""


class FaultPlugin:
    """A plugin that misbehaves on purpose (see :class:`FaultConfig`)."""

    Config = FaultConfig

    def __init__(self, config: FaultConfig) -> None:
        if config.fail_in == "create":
            raise RuntimeError("injected fault in create")
        self.name = "faulty"
        self.config = config
        self.calls = 0

    def _act(self, hook: str, context: PluginContext) -> object:
        self.calls += 1
        if self.config.mode == "garbage":
            return {"garbage": object(), "hook": hook, "tensor": torch.ones(3)}
        if self.config.mode == "mutate":
            context.epoch = 10_000
            context.epochs = 1
            context.global_step = -7
            context.batch_index = 12345
            context.training_batch_count = 0
            context.validation_batch_count = 999
            context.training_loss_total = 1e9
            context.validation_loss_total = -1e9
            return None
        if hook == self.config.fail_in:
            raise RuntimeError(f"injected fault in {hook}")
        return None

    def state_dict(self) -> dict[str, Any]:
        """``{"calls": n}``, or something a checkpoint cannot hold (``garbage_state``)."""
        if self.config.fail_in == "state_dict":
            raise RuntimeError("injected fault in state_dict")
        if self.config.mode == "garbage_state":
            return {"calls": self.calls, "handle": object()}
        return {"calls": self.calls}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores ``calls``."""
        if self.config.fail_in == "load_state_dict":
            raise RuntimeError("injected fault in load_state_dict")
        self.calls = int(state["calls"])


def _hook_method(hook: str) -> Any:
    def method(self: FaultPlugin, context: PluginContext) -> object:
        return self._act(hook, context)

    method.__name__ = hook
    return method


for _hook in HOOK_NAMES:
    setattr(FaultPlugin, _hook, _hook_method(_hook))


# -- the rogue plugin: what a plugin can do to the process it shares with bz ---------------------

_SIGNAL = signal.signal
"""Python's own ``signal.signal``, bound before bz trains: a library that kept a reference
to it installs handlers without going through bz's wrapper."""

RogueAct = Literal[
    "sigterm_exit",
    "sigterm_exit_bypass",
    "close_stdout",
    "close_stderr",
    "close_fd1",
    "close_fd2",
    "swallow",
    "swallow_nested",
    "swallow_two_signals",
    "block_signals",
    "block_timeout",
]


@attrs.frozen
class RogueConfig:
    """Options of the ``rogue`` plugin."""

    act: RogueAct = "sigterm_exit"
    """What it does, once, in ``hook``."""
    hook: str = "start_epoch"
    then_raise: bool = False
    """Raise after acting."""
    signal_name: Literal["SIGTERM", "SIGINT"] = "SIGTERM"
    """The signal ``swallow_two_signals`` and ``block_signals`` send themselves twice."""


def _exit_zero(signum: int, frame: object) -> None:
    sys.exit(0)  # what some logging clients' SIGTERM handlers do


def _swallow_everything() -> None:
    while True:
        try:  # noqa: SIM105  # written as such plugins are: contextlib.suppress would hide it
            time.sleep(0.05)
        except BaseException:  # the point: a hook that will not stop
            pass


def _swallow_nested() -> None:
    while True:
        try:  # noqa: SIM105  # written as such plugins are: contextlib.suppress would hide it
            _swallow_everything()
        except BaseException:  # the point: a hook that will not stop
            pass


def _two_signals_then_swallow(name: str) -> None:
    number = getattr(signal, name)
    try:
        os.kill(os.getpid(), number)  # the first: stop after this step, please
        os.kill(os.getpid(), number)  # the second, while this hook still runs
    except BaseException:  # the point: a hook that will not stop
        pass
    _swallow_everything()


class RoguePlugin:
    """A plugin that acts on the process it shares with bz (see :class:`RogueConfig`)."""

    Config = RogueConfig

    def __init__(self, config: RogueConfig) -> None:
        self.name = "rogue"
        self.config = config
        self.done = False

    def _act(self, hook: str) -> None:
        if self.done or hook != self.config.hook:
            return
        self.done = True
        act = self.config.act
        if act == "sigterm_exit":
            signal.signal(signal.SIGTERM, _exit_zero)
        elif act == "sigterm_exit_bypass":
            _SIGNAL(signal.SIGTERM, _exit_zero)
        elif act in ("close_stdout", "close_stderr"):
            getattr(sys, act.removeprefix("close_")).close()
        elif act in ("close_fd1", "close_fd2"):
            os.close(int(act[-1]))
        elif act == "swallow":
            _swallow_everything()
        elif act == "swallow_nested":
            _swallow_nested()
        elif act == "swallow_two_signals":
            _two_signals_then_swallow(self.config.signal_name)
        elif act == "block_signals":
            # Like native code that never returns: the escalation's force never lands.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            _two_signals_then_swallow(self.config.signal_name)
        elif act == "block_timeout":
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            _swallow_everything()
        if self.config.then_raise:
            raise RuntimeError(f"rogue fails after {act}")


def _rogue_method(hook: str) -> Any:
    def method(self: RoguePlugin, context: PluginContext) -> None:
        self._act(hook)

    method.__name__ = hook
    return method


for _hook in HOOK_NAMES:
    setattr(RoguePlugin, _hook, _rogue_method(_hook))


# -- a distribution that bz discovers --------------------------------------------------------


def install_fake_distribution(folder: Path) -> Path:
    """Write a ``*.dist-info`` registering ``faulty`` and ``broken_import`` into ``folder``.

    Put ``folder`` on ``sys.path`` (``monkeypatch.syspath_prepend``) or ``PYTHONPATH``
    and ``importlib.metadata`` finds it like any installed package.
    """
    folder.mkdir(parents=True, exist_ok=True)
    info = folder / "bz_fault_plugins-0.0.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {FAULT_DISTRIBUTION}\nVersion: 0.0.0\n", encoding="utf-8"
    )
    (info / "entry_points.txt").write_text(
        "[bz.plugins]\n"
        "faulty = tests._fault_support:FaultPlugin\n"
        "rogue = tests._fault_support:RoguePlugin\n"
        "broken_import = bz_fault_broken_module:Plugin\n",
        encoding="utf-8",
    )
    (folder / "bz_fault_broken_module.py").write_text(
        'raise RuntimeError("injected fault at import")\n', encoding="utf-8"
    )
    return folder


def final_model_state(project: Path) -> dict[str, torch.Tensor]:
    """The model weights in the newest checkpoint under ``project/.bz/checkpoints``."""
    files = sorted((project / ".bz" / "checkpoints").glob("*/epoch-*.pt"))
    assert files, f"no checkpoint under {project}"
    newest = max(files, key=lambda path: path.name)
    payload = torch.load(newest, map_location="cpu", weights_only=True)
    model: dict[str, torch.Tensor] = payload["model"]
    return model


# -- subprocesses that die on cue ------------------------------------------------------------


def no_rendering(*args: Any, **kwargs: Any) -> None:
    """Stands in for the CLI's log set-up, which would replace ``capture_logs``."""


def write_half_and_die(real_save: Any, obj: object, file: Any) -> NoReturn:
    """Write the first half of what ``torch.save`` would, then die by SIGKILL: the state
    a crash in the middle of a checkpoint write leaves behind."""
    buffer = io.BytesIO()
    real_save(obj, buffer)
    data = buffer.getvalue()
    file.write(data[: len(data) // 2])
    file.flush()
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable: SIGKILL ends the process")


def _signal_in_event(name: str, chosen: signal.Signals) -> None:
    """Send ``chosen`` to this process while bz writes the first ``name`` event's line
    to stdout (``--log-format json``): the signal lands inside a log write."""
    from bz import _stdio

    marker = f'"event": "{name}"'
    sent = [False]

    def signal_first(text: str) -> None:
        if not sent[0] and marker in text:
            sent[0] = True
            os.kill(os.getpid(), chosen)

    real_write = sys.stdout.write

    def write(text: str) -> int:
        signal_first(text)
        return real_write(text)

    sys.stdout.write = write  # type: ignore[method-assign]  # the test's fault injection
    # bz writes its lines through its own copy of descriptor 1 (bz._stdio) when it has one.
    owned_write = _stdio._OwnedStream.write

    def owned(self: Any, text: str) -> int:
        signal_first(text)
        return owned_write(self, text)

    _stdio._OwnedStream.write = owned  # type: ignore[method-assign]  # the test's fault injection


def child_main() -> None:
    """Run ``bz`` with ``sys.argv[1:]``, dying where the environment says.

    ``BZ_TEST_SIGNAL_AT_STEP=N`` and ``BZ_TEST_SIGNAL=KILL|INT|TERM``: send the signal to
    this process right after optimizer step N, or with ``BZ_TEST_SIGNAL_IN_EVENT=NAME``
    while the line of the first event ``NAME`` is being written (``--log-format json``).
    ``BZ_TEST_KILL_IN_WRITE=N``: during the
    N-th checkpoint write, write half of the file and die with SIGKILL (the state a
    crash leaves behind).
    """
    from bz import commands as cli
    from bz.training.epoch import EpochLoop

    at_step = int(os.environ.get("BZ_TEST_SIGNAL_AT_STEP", "0"))
    chosen = getattr(signal, "SIG" + os.environ.get("BZ_TEST_SIGNAL", "KILL"))
    if at_step:
        from bz.training.control import StepControl

        original_init, original_after = StepControl.__init__, EpochLoop.after_step

        def init(self: StepControl, *args: Any, **kwargs: Any) -> None:
            original_init(self, *args, **kwargs)
            self.idle = False  # so that every optimizer step reaches EpochLoop.after_step

        def after_step(self: EpochLoop, index: int) -> Any:
            # Right after the step's last hook, before anything it leads to (a checkpoint).
            if self.state.global_step == at_step:
                os.kill(os.getpid(), chosen)
            return original_after(self, index)

        # The test's fault injection:
        StepControl.__init__ = init  # type: ignore[method-assign]
        EpochLoop.after_step = after_step  # type: ignore[method-assign]

    in_event = os.environ.get("BZ_TEST_SIGNAL_IN_EVENT")
    if in_event:
        _signal_in_event(in_event, chosen)

    kill_in_write = int(os.environ.get("BZ_TEST_KILL_IN_WRITE", "0"))
    if kill_in_write:
        real_save = torch.save
        writes = [0]

        def save(obj: object, file: Any, *args: Any, **kwargs: Any) -> None:
            writes[0] += 1
            if writes[0] != kill_in_write:
                real_save(obj, file, *args, **kwargs)
                return
            write_half_and_die(real_save, obj, file)

        torch.save = save  # type: ignore[assignment]  # the test's fault injection

    cli.main(sys.argv[1:])


if __name__ == "__main__":
    child_main()

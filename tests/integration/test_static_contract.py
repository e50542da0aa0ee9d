"""The static contract: mypy --strict accepts correct plugins (and steps) and rejects broken ones.

Plugin modules are written to a temporary folder and checked in one ``mypy.api.run``,
the way a plugin package's own CI would check them (see docs/plugin-guide.md, "Static
checking"). Each broken module must fail with a message that tells its author what is
wrong, at the line where it is wrong.
"""

from __future__ import annotations

import os
import re
import textwrap

import pytest
from mypy import api

# One cold mypy run over bz and its dependencies: ~15-25 s on two cores.
pytestmark = pytest.mark.slow

GOOD = {
    "structural_with_config": """
        import attrs
        from bz.plugins import ConfiguredPluginClass, NamedPlugin, PluginContext, hook


        @attrs.frozen
        class TimerConfig:
            every: int = 2


        class Timer:
            name = "timer"
            Config = TimerConfig

            def __init__(self, config: TimerConfig) -> None:
                self.config = config

            @hook
            def end_epoch(self, context: PluginContext) -> None:
                context.training_metrics["seconds"] = 1.0


        _contract: ConfiguredPluginClass[TimerConfig] = Timer
        _plugin: NamedPlugin = Timer(TimerConfig(every=3))
    """,
    "own_step": """
        from dataclasses import dataclass

        import torch
        from torch import nn

        import bz


        @dataclass
        class Readings:
            signal: torch.Tensor
            label: torch.Tensor


        def step(model: nn.Module, batch: Readings) -> bz.StepResult:
            logits = model(batch.signal)
            loss = nn.functional.cross_entropy(logits, batch.label)
            return bz.StepResult(loss, predictions=logits, targets=batch.label, samples=8)


        def loss_only(model: nn.Module, batch: Readings) -> torch.Tensor:
            return nn.functional.cross_entropy(model(batch.signal), batch.label)


        model = nn.Linear(3, 2)
        _setup = bz.TrainingSetup(
            model=model, step=step, optimizer=torch.optim.SGD(model.parameters()), train_loader=[]
        )
        _other = bz.TrainingSetup(
            model=model,
            step=loss_only,
            optimizer=torch.optim.SGD(model.parameters()),
            train_loader=[],
            scheduler_interval="step",
        )
    """,
    "structural_without_options": """
        from bz.plugins import NamedPlugin, PluginContext, hook


        class Stopper:
            def __init__(self) -> None:
                self.name = "stopper"

            @hook
            def end_epoch(self, context: PluginContext) -> None:
                context.should_stop_training = context.epoch >= 3


        _plugin: NamedPlugin = Stopper()
    """,
    "subclass_like_the_guide": """
        from typing import Any

        from bz import RunConfig, Trainer, TrainingSetup
        from bz.plugins import CreatingPluginClass, Plugin, PluginContext


        class MyPlugin(Plugin):
            name = "my_plugin"

            def __init__(self, log_interval: int = 10) -> None:
                super().__init__(name=self.name)
                self.log_interval = log_interval

            def end_epoch(self, context: PluginContext) -> None:
                if context.epoch % self.log_interval == 0:
                    self.logger.info("loss", loss=context.training_loss_total)

            @staticmethod
            def load_config(config_data: dict[str, Any]) -> dict[str, Any]:
                return {"log_interval": config_data.get("log_interval", 10)}

            @staticmethod
            def create(config_data: dict[str, Any], training_config: RunConfig) -> "MyPlugin":
                return MyPlugin(**MyPlugin.load_config(config_data))


        _contract: CreatingPluginClass = MyPlugin


        def train(setup: TrainingSetup) -> None:
            Trainer().fit(setup, RunConfig(epochs=1), plugins=[MyPlugin()])
    """,
    "subclass_with_its_own_stdlib_logger": """
        import logging

        from bz.plugins import Plugin, PluginContext


        class OldStyle(Plugin):
            name = "old_style"

            def __init__(self) -> None:
                super().__init__()
                self.logger = logging.getLogger(__name__)  # as bz-cli 0.x plugins do

            def end_epoch(self, context: PluginContext) -> None:
                self.logger.info("epoch %d", context.epoch)
    """,
}

# module -> (line, the part of mypy's message that names the problem)
BAD = {
    "wrong_hook_signature_structural": (
        """
        from bz.plugins import PluginContext, hook


        class Timer:
            name = "timer"

            @hook
            def end_epoch(self, context: int) -> None: ...
        """,
        7,
        'Value of type variable "HookT" of "hook" cannot be "Callable[[Timer, int], None]"',
    ),
    "hook_without_context": (
        """
        from bz.plugins import hook


        class Timer:
            name = "timer"

            @hook
            def start_epoch(self) -> None: ...
        """,
        7,
        'Value of type variable "HookT" of "hook" cannot be "Callable[[Timer], None]"',
    ),
    "wrong_hook_signature_subclass": (
        """
        from bz.plugins import Plugin


        class MyPlugin(Plugin):
            name = "my_plugin"

            def end_epoch(self, context: int) -> None: ...
        """,
        7,
        'Argument 1 of "end_epoch" is incompatible with supertype "bz.plugins._protocol.Plugin"; '
        'supertype defines the argument type as "PluginContext"',
    ),
    "hook_returning_a_value": (
        """
        from bz.plugins import Plugin, PluginContext


        class MyPlugin(Plugin):
            name = "my_plugin"

            def end_epoch(self, context: PluginContext) -> bool:
                return True
        """,
        7,
        'Return type "bool" of "end_epoch" incompatible with return type "None" in supertype',
    ),
    "constructor_takes_another_config": (
        """
        import attrs
        from bz.plugins import ConfiguredPluginClass


        @attrs.frozen
        class TimerConfig:
            every: int = 2


        class Timer:
            name = "timer"
            Config = TimerConfig

            def __init__(self, config: dict[str, int]) -> None: ...


        _contract: ConfiguredPluginClass[TimerConfig] = Timer
        """,
        17,
        '"Timer" has constructor incompatible with "__call__" of "ConfiguredPluginClass"',
    ),
    "config_default_of_the_wrong_type": (
        """
        import attrs


        @attrs.frozen
        class TimerConfig:
            every: int = "2"
        """,
        6,
        'Incompatible types in assignment (expression has type "str", variable has type "int")',
    ),
    "create_returns_no_plugin": (
        """
        from typing import Any

        from bz import RunConfig
        from bz.plugins import CreatingPluginClass, Plugin


        class MyPlugin(Plugin):
            name = "my_plugin"

            @staticmethod
            def create(config_data: dict[str, Any], training_config: RunConfig) -> int:
                return 1


        _contract: CreatingPluginClass = MyPlugin
        """,
        15,
        'Incompatible types in assignment (expression has type "type[MyPlugin]", '
        'variable has type "CreatingPluginClass")',
    ),
    "step_without_the_batch": (
        """
        import torch
        from torch import nn

        import bz


        def step(model: nn.Module) -> torch.Tensor:
            return torch.zeros(())


        model = nn.Linear(3, 2)
        bz.TrainingSetup(
            model=model, step=step, optimizer=torch.optim.SGD(model.parameters()), train_loader=[]
        )
        """,
        13,
        'Argument "step" to "TrainingSetup" has incompatible type',
    ),
    "step_result_samples_not_an_int": (
        """
        from typing import Any

        import bz


        def step(model: Any, batch: Any) -> bz.StepResult:
            return bz.StepResult(model(batch), samples="8")
        """,
        7,
        'Argument "samples" to "StepResult" has incompatible type "str"',
    ),
    "scheduler_interval_unknown": (
        """
        from typing import Any

        import bz


        def setup(model: Any, optimizer: Any) -> bz.TrainingSetup:
            return bz.TrainingSetup(
                model=model, optimizer=optimizer, train_loader=[], scheduler_interval="batch"
            )
        """,
        8,
        'Argument "scheduler_interval" to "TrainingSetup" has incompatible type',
    ),
    "name_not_a_string_structural": (
        """
        from bz.plugins import NamedPlugin


        class Timer:
            name = 3


        _plugin: NamedPlugin = Timer()
        """,
        8,
        'Incompatible types in assignment (expression has type "Timer", '
        'variable has type "NamedPlugin")',
    ),
    "name_not_a_string_subclass": (
        """
        from bz.plugins import Plugin


        class MyPlugin(Plugin):
            name = 3
        """,
        5,
        'Incompatible types in assignment (expression has type "int", '
        'base class "Plugin" defined the type as "str")',
    ),
}

# torch's own annotations are irrelevant to the plugin contract and make a cold mypy run
# take a minute: seen from these modules, torch is Any.
MYPY_CONFIG = """
[mypy]
strict = True
python_version = 3.11
warn_unreachable = True

[mypy-torch.*]
follow_imports = skip
"""

_LINE = re.compile(r"^(?P<module>[\w]+)\.py:(?P<line>\d+): (?P<kind>error|note): (?P<text>.*)$")


@pytest.fixture(scope="module")
def mypy_messages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple[int, str]]]:
    """module -> [(line, message)] for every module above, from one mypy run."""
    folder = tmp_path_factory.mktemp("plugins")
    sources = {**GOOD, **{name: source for name, (source, _, _) in BAD.items()}}
    for name, source in sources.items():
        (folder / f"{name}.py").write_text(textwrap.dedent(source).lstrip(), encoding="utf-8")
    (folder / "mypy.ini").write_text(MYPY_CONFIG, encoding="utf-8")
    stdout, stderr, _status = api.run(
        [
            "--config-file",
            str(folder / "mypy.ini"),
            "--cache-dir",
            str(folder / ".mypy_cache"),
            "--no-error-summary",
            "--show-absolute-path",
            *(str(folder / f"{name}.py") for name in sources),
        ]
    )
    assert not stderr, stderr
    messages: dict[str, list[tuple[int, str]]] = {name: [] for name in sources}
    prefix = f"{folder}{os.sep}"
    for line in stdout.splitlines():
        # Only our modules: bz itself may be reported when it is not an installed package.
        match = _LINE.match(line.removeprefix(prefix)) if line.startswith(prefix) else None
        if match is not None:
            text = match["text"] if match["kind"] == "error" else f"note: {match['text']}"
            messages[match["module"]].append((int(match["line"]), text))
    return messages


@pytest.mark.parametrize("module", sorted(GOOD))
def test_correct_plugins_pass(
    module: str, mypy_messages: dict[str, list[tuple[int, str]]]
) -> None:
    assert mypy_messages[module] == []


@pytest.mark.parametrize("module", sorted(BAD))
def test_broken_plugins_are_rejected_where_they_break(
    module: str, mypy_messages: dict[str, list[tuple[int, str]]]
) -> None:
    _, line, expected = BAD[module]
    errors = [text for _, text in mypy_messages[module] if not text.startswith("note:")]
    assert errors, f"mypy accepted {module}"
    at_line = [text for at, text in mypy_messages[module] if at == line]
    assert any(expected in text for text in at_line), mypy_messages[module]


def test_mypy_explains_which_member_conflicts(
    mypy_messages: dict[str, list[tuple[int, str]]],
) -> None:
    notes = [text for _, text in mypy_messages["name_not_a_string_structural"]]
    assert 'note: Following member(s) of "Timer" have conflicts:' in notes
    assert 'note:     name: expected "str", got "int"' in notes

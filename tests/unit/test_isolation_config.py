"""The ``isolation`` framework key of a plugin's options: its contract, its listing, and
what a process plugin costs the training loop in host reads."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests._isolation_support import install_isolation_distribution
from tests._support import tiny_setup

from bz._errors import ConfigError
from bz.commands.catalog import isolation_choices
from bz.commands.schema import bzconfig_schema
from bz.config import PluginSpec, RunConfig
from bz.plugins import PluginContext
from bz.plugins._isolated import ISOLATIONS, IsolatedPlugin
from bz.plugins._loader import check_plugin_options, load_plugins
from bz.plugins.early_stopping import EarlyStopping
from bz.plugins.ema import Ema
from bz.plugins.run_log import RunLog
from bz.testing import count_host_reads, run_plugin


@attrs.frozen
class _Options:
    every: int = 1


class _Counting:
    """Takes options, counts its epochs (in process)."""

    Config = _Options

    def __init__(self, config: _Options) -> None:
        self.name = "counting"
        self.config = config
        self.epochs = 0

    def end_epoch(self, context: PluginContext) -> None:
        self.epochs += 1


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=5,
)


@given(value=JSON.filter(lambda value: value not in ISOLATIONS))
def test_an_unknown_isolation_is_a_config_error_at_its_json_path(value: Any) -> None:
    spec = PluginSpec("counting", {"isolation": value}, "plugins[2].counting")
    with pytest.raises(ConfigError) as raised:
        load_plugins([spec], RunConfig(), registry={"counting": _Counting})
    ((path, message),) = raised.value.problems
    assert path == "plugins[2].counting.isolation"
    assert message == f'expected "in-process" or "process", got {json.dumps(value)}'


@given(every=st.integers(min_value=1, max_value=10**6))
def test_in_process_is_the_default_and_the_key_never_reaches_the_plugins_options(
    every: int,
) -> None:
    for options in ({"every": every}, {"every": every, "isolation": "in-process"}):
        spec = PluginSpec("counting", options, "plugins[0].counting")
        (plugin,) = load_plugins([spec], RunConfig(), registry={"counting": _Counting}).active
        assert isinstance(plugin, _Counting)
        assert plugin.config == _Options(every)


def test_process_isolation_needs_an_installed_plugin() -> None:
    spec = PluginSpec("counting", {"isolation": "process"}, "plugins[0].counting")
    with pytest.raises(ConfigError, match="needs an installed plugin"):
        load_plugins([spec], RunConfig(), registry={"counting": _Counting})


def test_check_config_checks_the_isolation_too() -> None:
    spec = PluginSpec("run_log", {"isolation": "threads"}, "plugins[0].run_log")
    with pytest.raises(ConfigError, match=r"plugins\[0\]\.run_log\.isolation"):
        check_plugin_options([spec], RunConfig())
    spec = PluginSpec("run_log", {"isolation": "process"}, "plugins[0].run_log")
    checked, faults = check_plugin_options([spec], RunConfig())
    assert "run_log" in checked
    assert faults == []


def test_the_schema_offers_isolation_for_every_plugin() -> None:
    schema = bzconfig_schema()
    text = json.dumps(schema)
    assert '"enum": ["in-process", "process"]' in text
    assert text.count('"isolation"') >= 5  # one per installed plugin


def test_list_plugins_says_where_each_plugin_may_run() -> None:
    assert isolation_choices(RunLog) == '"in-process" (default) or "process"'
    assert isolation_choices(Ema).startswith('"in-process" only (needs the training process: ')
    assert "some options need the training process" in isolation_choices(EarlyStopping)


# -- a process plugin in a real fit -----------------------------------------------------------


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(install_isolation_distribution(tmp_path / "site")))
    return tmp_path


def _reads(installed: Path, batches: int) -> Counter[str]:
    spec = PluginSpec("iso", {"isolation": "process", "record": str(installed / "r.json")})
    plugins = load_plugins([spec], RunConfig(), policy="raise")
    (proxy,) = plugins.active
    assert isinstance(proxy, IsolatedPlugin)
    counter: Counter[str] = Counter()
    with count_host_reads(counter):
        run_plugin(proxy, setup=tiny_setup(batches=batches))
    return counter


@pytest.mark.slow
def test_its_batch_hooks_read_nothing_from_the_device(installed: Path) -> None:
    # The host reads a fit with the process plugin makes do not grow with the batches:
    # its epoch-level hooks read the losses, its batch-level hooks read nothing.
    baseline_4 = Counter[str]()
    with count_host_reads(baseline_4):
        run_plugin([], setup=tiny_setup(batches=4))
    baseline_16 = Counter[str]()
    with count_host_reads(baseline_16):
        run_plugin([], setup=tiny_setup(batches=16))
    few, many = _reads(installed, 4), _reads(installed, 16)
    assert few - baseline_4 == many - baseline_16
    assert sum((few - baseline_4).values()) > 0  # the epoch-level hooks do read (exact)
    record = json.loads((installed / "r.json").read_text())
    assert [hook for hook, *_ in record["hooks"]].count("end_training_batch") == 32

"""The mlflow plugin against real tracking stores: a local sqlite one and `mlflow server`."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import Run
from tests._integration_support import fails_in_second_epoch, run_config, tiny_setup

import bz
from bz.plugins import PluginContext
from bz.plugins.mlflow_logger import Mlflow, MlflowConfig, safe_key
from bz.testing import count_host_reads
from bz.testing import tiny_setup as sized_setup


@pytest.fixture(autouse=True)
def _quiet_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing reaches the network; MLflow's files stay in the test's folder.
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    for variable in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite store for the module (creating its tables takes seconds)."""
    folder = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{folder / 'mlflow.db'}"


def _only_run(client: MlflowClient, experiment: str) -> Run:
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    (run,) = client.search_runs([found.experiment_id])
    return run


def _history(client: MlflowClient, run: Run, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]


def test_params_metrics_and_status_reach_the_store(store: str) -> None:
    long_value = "x" * 10_000
    config = run_config(
        epochs=3,
        hyperparameters={"lr": 0.1, "optim": {"momentum": 0.9}, "notes": long_value, "a@b": 1},
    )
    plugin = Mlflow(
        MlflowConfig(
            tracking_uri=store,
            experiment_name="params",
            run_name="first",
            tags={"team": "vision"},
        )
    )
    result = bz.Trainer().fit(tiny_setup(), config, [plugin])

    client = MlflowClient(store)
    run = _only_run(client, "params")
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "first"
    assert run.data.tags["team"] == "vision"
    params = run.data.params
    assert params["lr"] == "0.1"
    assert params["optim.momentum"] == "0.9"
    assert params["notes"] == "x" * 6000  # cut to what MLflow stores, not a failure
    assert params["a_b"] == "1"  # a character MLflow refuses in keys becomes _
    assert params["config.epochs"] == "3"
    assert params["config.device"] == "cpu"
    training = [r.training_loss for r in result.history]
    logged = _history(client, run, "loss/training")
    assert [step for step, _ in logged] == [1, 2, 3]  # epochs from 1, as tensorboard
    assert [value for _, value in logged] == pytest.approx(training)
    accuracy = _history(client, run, "accuracy/validation")
    expected = [r.validation_metrics["accuracy"] for r in result.history]
    assert [value for _, value in accuracy] == pytest.approx(expected)
    assert [value for _, value in _history(client, run, "lr")] == pytest.approx([0.1] * 3)


def test_the_final_weights_are_an_artifact(store: str, tmp_path: Path) -> None:
    plugin = Mlflow(MlflowConfig(tracking_uri=store, experiment_name="model", log_model=True))
    setup = tiny_setup()
    bz.Trainer().fit(setup, run_config(epochs=1), [plugin])

    client = MlflowClient(store)
    run = _only_run(client, "model")
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["model.pt"]
    local = client.download_artifacts(run.info.run_id, "model.pt", str(tmp_path))
    weights = torch.load(local, weights_only=True)
    for name, tensor in setup.model.state_dict().items():
        assert torch.equal(weights[name], tensor)


def test_step_scalars_are_logged_against_the_global_step(store: str) -> None:
    plugin = Mlflow(MlflowConfig(tracking_uri=store, experiment_name="steps", step_interval=2))
    bz.Trainer().fit(tiny_setup(), run_config(epochs=2), [plugin])

    client = MlflowClient(store)
    run = _only_run(client, "steps")
    assert [step for step, _ in _history(client, run, "step/grad_norm")] == [2, 4, 6, 8]
    assert all(value > 0 for _, value in _history(client, run, "step/grad_norm"))
    assert [value for _, value in _history(client, run, "step/lr")] == pytest.approx([0.1] * 4)
    assert len(_history(client, run, "step/loss")) == 4


def test_a_failing_run_is_failed_and_keeps_what_was_logged(store: str) -> None:
    plugin = Mlflow(MlflowConfig(tracking_uri=store, experiment_name="failing"))
    with pytest.raises(RuntimeError, match="boom"):
        bz.Trainer().fit(fails_in_second_epoch(), run_config(epochs=3), [plugin])

    client = MlflowClient(store)
    run = _only_run(client, "failing")
    assert run.info.status == "FAILED"
    assert [step for step, _ in _history(client, run, "loss/training")] == [1]


class _CtrlC:
    """Presses Ctrl-C (a real SIGINT) right after optimizer step ``at_step``."""

    name = "ctrl_c"

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def end_training_batch(self, context: PluginContext) -> None:
        if context.global_step == self.at_step:
            signal.raise_signal(signal.SIGINT)


def test_an_interrupted_run_is_failed_then_resumed_as_the_same_run(
    store: str, tmp_path: Path
) -> None:
    def plugin() -> Mlflow:
        return Mlflow(MlflowConfig(tracking_uri=store, experiment_name="resumed"))

    config = run_config(epochs=3, hyperparameters={"lr": 0.1})
    with pytest.raises(bz.TrainingInterrupted):
        bz.Trainer().fit(tiny_setup(), config, [plugin(), _CtrlC(6)], checkpoint_dir=tmp_path)
    client = MlflowClient(store)
    interrupted = _only_run(client, "resumed")
    assert interrupted.info.status == "FAILED"

    # Resumed with more epochs: the config changed; MLflow keeps the params it had.
    longer = config.with_overrides(epochs=4)
    result = bz.Trainer().fit(tiny_setup(), longer, [plugin()], checkpoint_dir=tmp_path)
    assert result.resumed_from is not None
    run = _only_run(client, "resumed")  # still one run
    assert run.info.run_id == interrupted.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.params["config.epochs"] == "3"
    assert [step for step, _ in _history(client, run, "loss/training")] == [1, 2, 3, 4]


def test_other_ranks_create_no_run(store: str) -> None:
    plugin = Mlflow(MlflowConfig(tracking_uri=store, experiment_name="rank1"))
    context = PluginContext(rank=1, world_size=2, epochs=1)
    plugin.start_training_session(context)
    plugin.start_epoch(context)
    plugin.end_epoch(context)
    plugin.end_training_session(context)
    assert MlflowClient(store).get_experiment_by_name("rank1") is None


@pytest.mark.parametrize(
    ("key", "safe"),
    [("loss/training", "loss/training"), ("a@b#c", "a_b_c"), ("", "_"), ("k" * 300, "k" * 250)],
)
def test_keys_are_made_acceptable(key: str, safe: str) -> None:
    assert safe_key(key) == safe


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def _server(folder: Path, timeout: float = 300.0, lifetime: float = 900.0) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1, stopped (and waited for) however the test ends.

    It runs under ``timeout``, in a process group of its own that ``timeout`` ends after
    ``lifetime`` seconds: a test process that dies first leaves no server behind.
    """
    port = _free_port()
    log = (folder / "server.log").open("wb")
    command = [
        "timeout",
        "--kill-after=10",
        str(int(lifetime)),
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{folder / 'server.db'}",
        "--artifacts-destination",
        str(folder / "artifacts"),
    ]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert server.poll() is None, (folder / "server.log").read_text(errors="replace")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                log.flush()
                output = (folder / "server.log").read_text(errors="replace")
                pytest.fail(f"mlflow server did not answer in {timeout:.0f} s:\n{output}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.mark.slow
def test_a_run_logged_to_an_mlflow_server(tmp_path: Path) -> None:
    with _server(tmp_path) as url:
        plugin = Mlflow(MlflowConfig(tracking_uri=url, experiment_name="served", log_model=True))
        setup = tiny_setup()
        config: Any = run_config(epochs=2, hyperparameters={"lr": 0.1})
        result = bz.Trainer().fit(setup, config, [plugin])

        client = MlflowClient(url)
        run = _only_run(client, "served")
        assert run.info.status == "FINISHED"
        assert run.data.params["lr"] == "0.1"
        logged = [value for _, value in _history(client, run, "loss/training")]
        assert logged == pytest.approx([r.training_loss for r in result.history])
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["model.pt"]


def _reads(store: str, batches: int, interval: int) -> Counter[str]:
    plugin = Mlflow(
        MlflowConfig(tracking_uri=store, experiment_name="reads", step_interval=interval)
    )
    counter: Counter[str] = Counter()
    with count_host_reads(counter):
        bz.Trainer().fit(sized_setup(batches=batches), run_config(epochs=2, metrics=[]), [plugin])
    return counter


def test_no_host_read_on_the_steps_nothing_is_logged(store: str) -> None:
    never = _reads(store, 16, interval=1000)
    assert _reads(store, 8, interval=1000) == never
    # 8 of the 32 steps logged, each one read of the loss and one of the gradient norm.
    extra = _reads(store, 16, interval=4) - never
    assert sum(extra.values()) == 8 * 2

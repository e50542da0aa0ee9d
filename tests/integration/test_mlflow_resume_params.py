"""A resumed MLflow run keeps its params and says which changed.

docs/integrations.md ("Resume"): "Params it already has are kept as they were (MLflow
cannot change a param; a changed value is reported as ``mlflow_params_kept``)". A real
sqlite store; the resume is ``fit`` again on the same checkpoint folder with more
epochs (``epochs`` is no part of the run's signature, so the finished run resumes).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog
from mlflow import MlflowClient
from tests._integration_support import run_config, tiny_setup

import bz
from bz.plugins.mlflow_logger import Mlflow, MlflowConfig

pytestmark = pytest.mark.slow  # importing MLflow and creating a sqlite store take seconds


@pytest.fixture(autouse=True)
def _quiet_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    for variable in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.chdir(tmp_path)


def test_a_changed_param_is_kept_and_reported(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def plugin() -> Mlflow:
        return Mlflow(MlflowConfig(tracking_uri=store, experiment_name="kept"))

    first = run_config(epochs=1, hyperparameters={"lr": 0.1})
    bz.Trainer().fit(tiny_setup(), first, [plugin()], checkpoint_dir=tmp_path / "ckpt")
    again = first.with_overrides(epochs=2)
    with structlog.testing.capture_logs() as events:
        result = bz.Trainer().fit(
            tiny_setup(), again, [plugin()], checkpoint_dir=tmp_path / "ckpt"
        )
    assert result.resumed_from is not None
    (kept,) = [event for event in events if event["event"] == "mlflow_params_kept"]
    assert "config.epochs" in kept["params"]

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("kept")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["config.epochs"] == "1"  # kept as the run started
    assert run.info.status == "FINISHED"

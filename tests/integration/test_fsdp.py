"""``distributed.strategy: "fsdp"``: two processes on gloo, started as users start them.

One uninterrupted FSDP run of the digits example (the module's ``reference``) is what
the interrupted runs' weights are measured against, and the checkpoint that one process
resumes. FSDP is compared with DDP on one pair of runs with ema and clipping
(``ema_and_norms``): the losses, ema's average, the gradient norms. All three runs also
record their threads at exit, for the gloo-shutdown test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
from click.testing import CliRunner
from tests._support import assert_same_weights, json_events, run_bz

import bz
from bz._distributed import Topology
from bz.commands import cli
from bz.config import FsdpConfig
from bz.training.fsdp import check_shardable

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "digits" / "train.py"

CONFIG = {
    "epochs": 2,
    "device": "cpu",
    "seed": 0,
    "hyperparameters": {"lr": 0.003, "hidden": 32, "batch_size": 64},
    "plugins": ["fsdp_probe"],
    "distributed": {"strategy": "fsdp"},
    "checkpoint_every_steps": 4,
}

# Appended to the digits example: kill -9 rank 0 while it publishes its first background
# sharded write (the shards are written, the checkpoint is not complete yet).
KILL_IN_BACKGROUND_WRITE = textwrap.dedent(
    """

    import os as _os
    import threading as _threading
    from pathlib import Path as _Path

    from bz.training.checkpoint import sharded as _checkpoint_sharded

    _finish = _checkpoint_sharded.finish


    def _dies_while_publishing(rest, path):
        marker = _Path("killed-in-write")
        if _os.environ.get("KILL_IN_WRITE") and not marker.exists():
            assert _threading.current_thread().name == "bz-checkpoint-writer"
            marker.write_text(path.name)
            _os.kill(_os.getpid(), 9)
        return _finish(rest, path)


    _checkpoint_sharded.finish = _dies_while_publishing
    """
)

PROBE = textwrap.dedent(
    """
    import atexit
    import json
    import os
    import signal
    from pathlib import Path

    from bz.training.fsdp import local_parameter_bytes


    def _threads_at_exit(path):
        # Run when the interpreter starts shutting down: the names of this process's
        # threads (gloo names its own), which must all be joined by then.
        tasks = Path("/proc/self/task")
        names = [(task / "comm").read_text().strip() for task in tasks.iterdir()]
        path.write_text(json.dumps(sorted(names)))


    class FsdpProbe:
        name = "fsdp_probe"
        every_rank = True

        def start_training_session(self, context):
            full = sum(p.numel() * p.element_size() for p in context.model.parameters())
            local = local_parameter_bytes(context.model)
            Path(f"storage-{context.rank}.json").write_text(json.dumps([local, full]))
            if os.environ.get("THREADS_AT_EXIT"):
                atexit.register(_threads_at_exit, Path(f"threads-{context.rank}.json").resolve())

        def end_training_batch(self, context):
            # SIGTERM from outside (a scheduler's), once, after step 6: to the launcher,
            # which passes it on to every process.
            marker = Path("sigterm-sent")
            if os.environ.get("SIGTERM_AT_STEP_6") and context.rank == 0:
                if context.global_step == 6 and not marker.exists():
                    marker.write_text("")
                    os.kill(os.getppid(), signal.SIGTERM)


    class NormProbe:
        # On rank 0 alone, as loggers run: the gradient norm of every step.

        name = "norm_probe"

        def before_optimizer_step(self, context):
            norm = context._gradient_norm
            kind = type(norm).__name__
            # A norm of sharded gradients is a DTensor: reading it on rank 0 alone would
            # wait forever for the other process, so only its kind is recorded then.
            value = context.gradient_norm if kind == "Tensor" else None
            with open("norms.jsonl", "a") as out:
                out.write(json.dumps([context.global_step + 1, kind, value]) + "\\n")
    """
)


def make_project(folder: Path, **changes: Any) -> dict[str, str]:
    """The digits example with ``CONFIG`` (plus ``changes``) and the probe plugin."""
    folder.mkdir(parents=True, exist_ok=True)
    source = EXAMPLE.read_text(encoding="utf-8") + KILL_IN_BACKGROUND_WRITE
    (folder / "train.py").write_text(source, encoding="utf-8")
    (folder / "bzconfig.json").write_text(json.dumps({**CONFIG, **changes}), encoding="utf-8")
    site = folder / "site"
    site.mkdir(exist_ok=True)
    (site / "bz_fsdp_probe.py").write_text(PROBE, encoding="utf-8")
    info = site / "bz_fsdp_probe-0.0.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bz-fsdp-probe\nVersion: 0.0.0\n")
    (info / "entry_points.txt").write_text(
        "[bz.plugins]\nfsdp_probe = bz_fsdp_probe:FsdpProbe\n"
        "norm_probe = bz_fsdp_probe:NormProbe\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    env.pop("BZ_CONFIG", None)
    return env


def train(
    folder: Path, env: dict[str, str], *args: str, processes: int = 2
) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    launcher = ["--nproc-per-node", str(processes)] if processes > 1 else []
    done = run_bz(folder, "train", *launcher, "--log-format", "json", *args, env=env)
    return done, json_events(done.stdout)


def epochs(events: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {e["epoch"]: e for e in events if e["event"] == "epoch_finished"}


def run_dir(folder: Path) -> Path:
    (found,) = (folder / ".bz" / "checkpoints").iterdir()
    return found


def final_weights(folder: Path) -> dict[str, torch.Tensor]:
    payload = torch.load(run_dir(folder) / "model.pt", map_location="cpu", weights_only=True)
    model: dict[str, torch.Tensor] = payload["model"]
    return model


@attrs.frozen
class Reference:
    folder: Path
    events: list[dict[str, Any]]


def _reference_run(folder: Path, **changes: Any) -> Reference:
    # Each process also writes the names of its threads at exit (threads-RANK.json).
    done, events = train(folder, {**make_project(folder, **changes), "THREADS_AT_EXIT": "1"})
    assert done.returncode == 0, done.stderr
    return Reference(folder, events)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """The uninterrupted two-process FSDP run."""
    return _reference_run(tmp_path_factory.mktemp("fsdp") / "reference")


# -- before training -------------------------------------------------------------------


def test_what_fsdp_cannot_shard_is_refused_before_training() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    two = Topology(0, 2, 0)
    with pytest.raises(bz.UsageError, match="needs several processes"):
        check_shardable(model, FsdpConfig(), Topology())
    with pytest.raises(bz.UsageError, match="no parameters to shard"):
        check_shardable(torch.nn.Sequential(torch.nn.ReLU()), FsdpConfig(), two)
    with pytest.raises(bz.UsageError, match="no submodule of class 'Block'"):
        check_shardable(model, FsdpConfig(shard_modules=("Linear", "Block")), two)
    with pytest.raises(bz.UsageError, match="offload_to_cpu needs a GPU"):
        check_shardable(model, FsdpConfig(offload_to_cpu=True), two, torch.device("cpu"))
    check_shardable(model, FsdpConfig(shard_modules=("Linear",)), two, torch.device("cpu"))


def test_fsdp_alone_is_one_line_and_exit_2_before_training(tmp_path: Path) -> None:
    make_project(tmp_path, plugins=[])
    config = str(tmp_path / "bzconfig.json")
    done = CliRunner().invoke(cli, ["train", "--config", config])
    assert done.exit_code == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("bz: error")]
    assert errors == [
        'bz: error: distributed.strategy "fsdp" needs several processes (bz train '
        '--nproc-per-node N, or torchrun); alone, use the default "ddp"'
    ]
    assert "Traceback" not in done.output
    assert not list(tmp_path.glob(".bz/**/epoch-*")), "refused before training"


# -- two processes ------------------------------------------------------------------------


@attrs.frozen
class EmaAndNorms:
    folder: Path
    epochs: dict[int, dict[str, Any]]
    model: dict[str, torch.Tensor]
    norms: list[list[Any]]


@pytest.fixture(scope="module")
def ema_and_norms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, EmaAndNorms]:
    """Per strategy: a run with ema and the gradient-norm probe, gradients clipped.

    One pair of runs for the comparisons of FSDP with DDP: the losses, ema's average
    (validated on, written as model.pt) and the gradient norm each step sees. Clipping
    changes none of the comparisons' terms; the probes only read (``fsdp_probe``: each
    process writes the names of its threads at exit, threads-RANK.json).
    """
    ema = {"ema": {"decay": 0.9, "validate_with_ema": True, "apply_at_end": True}}
    runs = {}
    for strategy in ("fsdp", "ddp"):
        folder = tmp_path_factory.mktemp(strategy) / "ema-and-norms"
        env = make_project(
            folder,
            plugins=[ema, "norm_probe", "fsdp_probe"],
            gradient_clip={"max_norm": 0.5},
            distributed={"strategy": strategy},
        )
        done, events = train(folder, {**env, "THREADS_AT_EXIT": "1"})
        assert done.returncode == 0, done.stderr
        assert not [e for e in events if e["event"] == "plugin_failed"]
        norms = [json.loads(line) for line in (folder / "norms.jsonl").open()]
        runs[strategy] = EmaAndNorms(folder, epochs(events), final_weights(folder), norms)
    return runs


@pytest.mark.slow
def test_fsdp_trains_like_ddp_with_half_the_parameters_on_each_process(
    reference: Reference, ema_and_norms: dict[str, EmaAndNorms]
) -> None:
    for rank in (0, 1):
        local, full = json.loads((reference.folder / f"storage-{rank}.json").read_text())
        assert abs(local - full / 2) <= 0.05 * full, f"rank {rank} holds {local} of {full} bytes"
    # The losses of the pair of runs with ema and clipping (ema_and_norms): the training
    # losses are the trained weights' (ema only averages them), the validation losses
    # the average's; clipped steps take the whole gradient's norm on both strategies.
    fsdp, ddp = ema_and_norms["fsdp"].epochs, ema_and_norms["ddp"].epochs
    assert sorted(fsdp) == sorted(ddp) == sorted(epochs(reference.events)) == [1, 2]
    for epoch, expected in ddp.items():
        got = fsdp[epoch]
        assert got["training_loss"] == pytest.approx(expected["training_loss"], rel=1e-5)
        assert got["validation_loss"] == pytest.approx(expected["validation_loss"], rel=1e-5)
    names = sorted(p.name for p in run_dir(reference.folder).iterdir())
    assert "epoch-0002.dcp" in names
    assert "epoch-0002.dcp.json" in names
    # The final weights are whole (gathered on rank 0), for plain torch.load.
    shapes = {key: tuple(value.shape) for key, value in final_weights(reference.folder).items()}
    assert shapes == {"0.weight": (32, 64), "0.bias": (32,), "3.weight": (10, 32), "3.bias": (10,)}


@pytest.mark.slow
def test_ema_averages_like_ddp_and_validates_on_the_average(
    ema_and_norms: dict[str, EmaAndNorms],
) -> None:
    # Each FSDP process averages its shards; DDP's processes each the whole model. The
    # validation losses (on the average) and model.pt (the average) agree.
    fsdp, fsdp_model = ema_and_norms["fsdp"].epochs, ema_and_norms["fsdp"].model
    ddp, ddp_model = ema_and_norms["ddp"].epochs, ema_and_norms["ddp"].model
    assert sorted(fsdp) == sorted(ddp) == [1, 2]
    for epoch, expected in ddp.items():
        got = fsdp[epoch]["validation_loss"]
        assert got == pytest.approx(expected["validation_loss"], rel=1e-5)
    for key, value in ddp_model.items():
        torch.testing.assert_close(fsdp_model[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names in /proc")
@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_no_gloo_thread_outlives_the_run_into_interpreter_shutdown(
    reference: Reference, ema_and_norms: dict[str, EmaAndNorms], strategy: str
) -> None:
    # A gloo group still alive at shutdown joins its worker threads there; one that still
    # had a finished collective's tensors to free aborted the process (SIGABRT, "terminate
    # called without an active exception"), now and then, after a successful run. The
    # module's runs (each a success) wrote their processes' thread names at exit.
    folders = [ema_and_norms[strategy].folder]
    if strategy == "fsdp":
        folders.append(reference.folder)
    for folder in folders:
        for rank in (0, 1):
            names = json.loads((folder / f"threads-{rank}.json").read_text())
            assert [name for name in names if "gloo" in name] == [], (folder, rank, names)


@pytest.mark.slow
def test_the_gradient_norm_is_whole_on_rank_0_and_the_same_as_under_ddp(
    ema_and_norms: dict[str, EmaAndNorms],
) -> None:
    fsdp, ddp = ema_and_norms["fsdp"].norms, ema_and_norms["ddp"].norms
    assert ddp, "the probe saw the steps"
    assert [kind for _, kind, _ in fsdp] == ["Tensor"] * len(ddp)
    assert [step for step, _, _ in fsdp] == [step for step, _, _ in ddp]
    expected = [value for _, _, value in ddp]
    assert [value for _, _, value in fsdp] == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_sigterm_and_kill_9_in_a_background_write_then_resume_end_like_no_interruption(
    reference: Reference, tmp_path: Path
) -> None:
    env = make_project(tmp_path)
    # SIGTERM: every process stops after the same step, with a sharded checkpoint there.
    done, events = train(tmp_path, {**env, "SIGTERM_AT_STEP_6": "1"})
    assert done.returncode != 0
    stopped = [e for e in events if e["event"] == "training_interrupted" and e["rank"] == 0]
    assert len(stopped) == 1
    assert Path(stopped[0]["checkpoint"]).name.endswith(".dcp")

    # Resumed with background writes; rank 0 is killed (-9) while publishing one.
    done, events = train(tmp_path, {**env, "KILL_IN_WRITE": "1"}, "--set", "checkpoint_async=true")
    assert done.returncode != 0
    killed_in = (tmp_path / "killed-in-write").read_text()
    assert not (run_dir(tmp_path) / killed_in).exists(), "the interrupted write never counts"
    assert [e for e in events if e["event"] == "resumed"]

    done, events = train(tmp_path, env, "--set", "checkpoint_async=true")
    assert done.returncode == 0, done.stderr
    (resumed,) = [e for e in events if e["event"] == "resumed"]
    assert resumed["path"].endswith(".dcp")
    assert_same_weights(final_weights(tmp_path), final_weights(reference.folder))


@pytest.mark.slow
def test_a_two_process_sharded_checkpoint_resumes_on_one_process(
    reference: Reference, tmp_path: Path
) -> None:
    # bz validate reads the sharded checkpoint into the whole model, in one process.
    sharded = run_dir(reference.folder) / "epoch-0002.dcp"
    config = str(reference.folder / "bzconfig.json")
    args = ["validate", "--config", config, "--checkpoint", str(sharded), "--json"]
    validated = CliRunner().invoke(cli, args)
    assert validated.exit_code == 0, validated.output
    report = json.loads(validated.stdout)
    logged = epochs(reference.events)[2]["validation_loss"]
    assert report["validation_loss"] == pytest.approx(logged, rel=1e-6)

    folder = tmp_path / "alone"
    shutil.copytree(reference.folder, folder)
    env = make_project(folder, distributed={"strategy": "ddp"}, plugins=[])
    done, events = train(folder, env, "--epochs", "3", processes=1)
    assert done.returncode == 0, done.stderr
    (resumed,) = [e for e in events if e["event"] == "resumed"]
    assert Path(resumed["path"]).name == "epoch-0002.dcp"
    assert sorted(epochs(events)) == [3], "it trained on from where the two processes ended"
    before, after = (
        torch.load(run_dir(f) / "model.pt", map_location="cpu", weights_only=True)
        for f in (reference.folder, folder)
    )
    assert after["epoch"] == 3
    assert after["global_step"] > before["global_step"]
    assert {k: v.shape for k, v in after["model"].items()} == {
        k: v.shape for k, v in before["model"].items()
    }

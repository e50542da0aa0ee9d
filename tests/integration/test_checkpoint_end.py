"""The end of a run, neighbours, junk and full disks: ``bz`` as a user runs it.

Each test drives ``bz train`` / ``bz validate`` as a user would and checks what they
would notice: the exit code, one clear line, and above all the weights — compared with
``torch.equal`` against a run that nothing happened to (a process of its own). The runs
that are killed, interrupted or made to fail a write are real processes; what comes after
them reads only what they left on disk (``bz validate``, the resumed or rebuilding ``bz
train``), so it runs in the test's process (:func:`here`, :func:`train_here`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from tests._checkpoint_support import SETUP_MARKER, TRAIN_PY
from tests._child import STORE_CHILD as CHILD
from tests._fault_support import BATCHES_PER_EPOCH, REPO_ROOT
from tests._support import TRAINING_DIED, assert_same_weights

from bz.commands import cli
from bz.training.checkpoint.files import FINAL_MODEL, read_checkpoint, sidecar
from bz.training.checkpoint.store import atomic_save

pytestmark = pytest.mark.slow

# Early stopping watching a value that only falls (the training loss) as if higher were
# better: the first epoch stays the best, so the weights the run ends with (restored)
# differ from the last checkpoint's, the case where losing model.pt loses them.
RESTORES = {"early_stopping": {"monitor": "training_loss", "mode": "max", "patience": 10}}
# The same with patience 1: the run stops after epoch 2 with epoch 1's weights.
STOPS = {"early_stopping": {"monitor": "training_loss", "mode": "max", "patience": 1}}


def _project(folder: Path, plugins: list[Any] | None = None, **config: Any) -> Path:
    folder.mkdir(parents=True)
    (folder / "train.py").write_text(TRAIN_PY, encoding="utf-8")
    data = {"epochs": 4, "device": "cpu", "seed": 11, "plugins": plugins or [], **config}
    (folder / "bzconfig.json").write_text(json.dumps(data), encoding="utf-8")
    return folder


def _start(folder: Path, *args: str, **faults: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BZ_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env.update(faults)
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, *args],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _parent(pid: int) -> int:
    """The parent of process ``pid`` (from /proc: Linux)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


class Done:
    """A finished ``bz``: exit code, JSON events (stdout) and stderr."""

    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        self.code, self.stdout, self.stderr = code, stdout, stderr

    @classmethod
    def of(cls, process: subprocess.Popen[str]) -> Done:
        """The process, waited for."""
        # A safety net for a hung child, not a timing assertion.
        stdout, stderr = process.communicate(timeout=900)
        return cls(process.returncode, stdout, stderr)

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.stdout.splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == name:
                    found.append(event)
        return found

    def expect(self, code: int) -> Done:
        assert self.code == code, f"exit {self.code}\n{self.stdout[-3000:]}\n{self.stderr[-3000:]}"
        return self


def bz(folder: Path, *args: str, **faults: str) -> Done:
    """Run ``bz ARGS`` in ``folder`` to the end."""
    return Done.of(_start(folder, *args, **faults))


def train(folder: Path, *args: str, **faults: str) -> Done:
    return bz(folder, "train", "--log-format", "json", *args, **faults)


def here(folder: Path, *args: str) -> Done:
    """``bz ARGS`` in ``folder``, run by this test process (click's runner).

    For the commands after the one a test interrupted, where a process of their own adds
    nothing: ``bz validate``'s report and exit code, and ``bz train`` on a finished run.
    The interrupted and the resumed ``bz train`` run in their own processes.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("BZ_CONFIG", raising=False)
        result = CliRunner().invoke(cli, list(args))
    return Done(result.exit_code, result.stdout, result.stderr)


def train_here(folder: Path, *args: str) -> Done:
    """``bz train --log-format json ARGS`` in this process (:func:`here`): a run nothing
    interrupts, or one that goes on from (or rebuilds from) what another left on disk."""
    return here(folder, "train", "--log-format", "json", *args)


def validate(folder: Path) -> Done:
    return here(folder, "validate", "--json")


def run_dir(folder: Path) -> Path:
    (found,) = (folder / ".bz" / "checkpoints").iterdir()
    return found


def model_weights(path: Path) -> dict[str, torch.Tensor]:
    return dict(read_checkpoint(path, model_only=True)["model"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Any, ...]]:
    """Per plugin set: the model.pt weights and `bz validate` report of a clean run."""
    cache: dict[str, tuple[Any, ...]] = {}

    def get(kind: str) -> tuple[Any, ...]:
        if kind not in cache:
            plugins = {"restores": [RESTORES], "stops": [STOPS]}[kind]
            folder = _project(tmp_path_factory.mktemp("clean") / kind, plugins)
            done = train(folder).expect(0)
            report = json.loads(validate(folder).expect(0).stdout)
            cache[kind] = (model_weights(run_dir(folder) / FINAL_MODEL), report, done)
        return cache[kind]

    return get


CLEAN_EPOCHS = 5


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], dict[str, torch.Tensor]]:
    """The weights after epoch N of one clean run without plugins (every checkpoint kept).

    The tests below compare a run that something happened to with "a clean run of N
    epochs": epoch N's checkpoint of this longer run holds exactly those weights (a run's
    epochs do not depend on how many follow: test_checkpoint's extended-epochs test), so
    one run serves them all.
    """
    folder = _project(
        tmp_path_factory.mktemp("clean") / "run", epochs=CLEAN_EPOCHS, keep_last=CLEAN_EPOCHS
    )
    train(folder).expect(0)

    def after(epochs: int) -> dict[str, torch.Tensor]:
        assert 1 <= epochs <= CLEAN_EPOCHS
        return model_weights(run_dir(folder) / f"epoch-{epochs:04d}.pt")

    return after


# -- 1. kill -9 at every stage of the end of a run ----------------------------------------

END_OF_RUN = {
    "in the last checkpoint's bytes": {"BZ_TEST_KILL_IN": "epoch-0004.pt"},
    "before the last checkpoint's sidecar": {"BZ_TEST_KILL_BEFORE": "epoch-0004.pt.json"},
    "between the last checkpoint's renames": {"BZ_TEST_KILL_BEFORE": "epoch-0004.pt"},
    "after the last checkpoint, before model.pt": {"BZ_TEST_KILL_AFTER": "epoch-0004.pt"},
    "in model.pt's bytes": {"BZ_TEST_KILL_IN": "model.pt"},
    "before model.pt's sidecar": {"BZ_TEST_KILL_BEFORE": "model.pt.json"},
    "between model.pt's renames": {"BZ_TEST_KILL_BEFORE": "model.pt"},
    "after model.pt": {"BZ_TEST_KILL_AFTER": "model.pt"},
}


@pytest.mark.parametrize("stage", list(END_OF_RUN))
def test_killed_at_the_end_then_train_and_validate_give_the_weights_it_ended_with(
    tmp_path: Path, reference: Callable[[str], tuple[Any, ...]], stage: str
) -> None:
    expected, expected_report, _ = reference("restores")
    folder = _project(tmp_path / "run", [RESTORES])
    train(folder, **END_OF_RUN[stage]).expect(TRAINING_DIED)

    again = train_here(folder).expect(0)
    final = run_dir(folder) / FINAL_MODEL
    assert_same_weights(model_weights(final), expected)
    report = json.loads(validate(folder).expect(0).stdout)
    assert report["checkpoint"] == str(final)
    assert report["validation_loss"] == expected_report["validation_loss"]
    assert (report["epoch"], report["step"]) == (4, 4 * BATCHES_PER_EPOCH)
    if "model.pt" in stage and stage != "after model.pt":
        assert len(again.events("model_rebuilding")) == 1
        assert again.events("epoch_finished") == [], "nothing is trained again"
    # And from then on the run is simply finished.
    assert "nothing to train" in here(folder, "train", "--log-format", "json").expect(0).stderr


def test_killed_before_model_pt_validate_refuses_to_guess_until_train_rebuilds_it(
    tmp_path: Path, reference: Callable[[str], tuple[Any, ...]]
) -> None:
    expected, _, _ = reference("restores")
    folder = _project(tmp_path / "run", [RESTORES])
    train(folder, BZ_TEST_KILL_AFTER="epoch-0004.pt").expect(TRAINING_DIED)
    refused = validate(folder).expect(2)
    assert refused.stderr.count("\n") == 1
    assert "run `bz train` to rebuild them" in refused.stderr
    rebuilt = here(folder, "train").expect(0)  # console output this time
    assert "its final weights were rebuilt from" in rebuilt.stderr
    assert_same_weights(model_weights(run_dir(folder) / FINAL_MODEL), expected)


@pytest.mark.parametrize("name", ["epoch-0002.pt", "model.pt"])
def test_a_run_stopped_early_and_killed_at_its_end_keeps_its_restored_weights(
    tmp_path: Path, reference: Callable[[str], tuple[Any, ...]], name: str
) -> None:
    expected, expected_report, clean = reference("stops")
    assert len(clean.events("early_stopping_restored")) == 1
    folder = _project(tmp_path / "run", [STOPS])
    train(folder, BZ_TEST_KILL_BEFORE=name).expect(TRAINING_DIED)
    again = train_here(folder).expect(0)
    assert_same_weights(model_weights(run_dir(folder) / FINAL_MODEL), expected)
    report = json.loads(validate(folder).expect(0).stdout)
    assert report["validation_loss"] == expected_report["validation_loss"]
    # Restored once over both processes: the rebuild resumes with the flag set.
    restored = again.events("early_stopping_restored")
    assert len(restored) == (1 if name == "epoch-0002.pt" else 0)


def test_a_corrupt_or_missing_model_pt_of_a_finished_run_is_rebuilt(
    tmp_path: Path, reference: Callable[[str], tuple[Any, ...]]
) -> None:
    expected, _, _ = reference("restores")
    folder = _project(tmp_path / "run", [RESTORES])
    train_here(folder).expect(0)
    final = run_dir(folder) / FINAL_MODEL
    data = bytearray(final.read_bytes())
    data[len(data) // 2] ^= 0xFF
    final.write_bytes(bytes(data))
    assert len(train_here(folder).expect(0).events("model_rebuilding")) == 1
    assert_same_weights(model_weights(final), expected)
    final.unlink()
    sidecar(final).unlink()
    assert len(train_here(folder).expect(0).events("model_rebuilding")) == 1
    assert_same_weights(model_weights(final), expected)


# -- 2. junk and damaged files beside good checkpoints ------------------------------------------


def test_junk_never_pushes_out_a_good_checkpoint_and_damage_falls_back_one(
    tmp_path: Path, clean: Callable[[int], dict[str, torch.Tensor]]
) -> None:
    folder = _project(tmp_path / "run", keep_last=2, epochs=2)
    train_here(folder).expect(0)
    where = run_dir(folder)
    junk = {"epoch-0098.pt": b"junk\n", "epoch-0099.pt": b"junk\n", "notes.md": b"mine\n"}
    for name, data in junk.items():
        (where / name).write_bytes(data)

    longer = train_here(folder, "--epochs", "4").expect(0)
    assert longer.events("resumed")[0]["epoch"] == 2
    ignored = sorted(Path(e["path"]).name for e in longer.events("checkpoint_ignored"))
    assert ignored == ["epoch-0098.pt", "epoch-0099.pt"]
    assert {p.name for p in where.glob("epoch-000*.pt")} == {"epoch-0003.pt", "epoch-0004.pt"}

    # A flipped byte in the newest checkpoint: the one before it is used, not scratch.
    newest = where / "epoch-0004.pt"
    damaged = bytearray(newest.read_bytes())
    damaged[len(damaged) // 3] ^= 0x01
    newest.write_bytes(bytes(damaged))
    last = train_here(folder, "--epochs", "5").expect(0)
    assert [Path(e["path"]).name for e in last.events("checkpoint_unreadable")] == [newest.name]
    assert last.events("resumed")[0]["epoch"] == 3
    for name, data in junk.items():
        assert (where / name).read_bytes() == data, f"{name} was touched"
    assert newest.exists(), "a damaged file is left for a person to look at"
    assert_same_weights(dict(read_checkpoint(where / "epoch-0005.pt")["model"]), clean(5))


# -- 3. two `bz train` on one run -------------------------------------------------------------


def test_a_second_bz_train_on_a_running_run_exits_2_naming_the_first(
    tmp_path: Path, clean: Callable[[int], dict[str, torch.Tensor]]
) -> None:
    folder = _project(tmp_path / "run", epochs=2)
    first = _start(folder, "train", "--log-format", "json", BZ_TEST_PAUSE_BEFORE="epoch-0001.pt")
    try:
        while not (folder / "paused").exists():  # the first is inside its first write
            assert first.poll() is None, first.communicate()
            time.sleep(0.05)
        in_flight = sorted(p.name for p in run_dir(folder).glob(".*.tmp"))
        # The training process writes (and holds the run): `bz train`'s supervised child.
        (writing,) = [int(name.split(".")[-2]) for name in in_flight]
        assert in_flight == [f".epoch-0001.pt.{writing}.tmp"]
        assert _parent(writing) == first.pid
        second = bz(folder, "train").expect(2)
        (line,) = [line for line in second.stderr.splitlines() if line.startswith("bz:")]
        assert "Traceback" not in second.stderr
        assert line.startswith("bz: error: another bz process")
        assert f"pid {writing} on {socket.gethostname()}" in line
        assert sorted(p.name for p in run_dir(folder).glob(".*.tmp")) == in_flight
    finally:
        (folder / "release").touch()
    Done.of(first).expect(0)
    assert_same_weights(model_weights(run_dir(folder) / FINAL_MODEL), clean(2))


# -- 4. nowhere to write ------------------------------------------------------------------------


def test_an_unwritable_checkpoint_folder_exits_2_before_setup_runs(tmp_path: Path) -> None:
    folder = _project(tmp_path / "run")
    (folder / "blocker").write_text("a file where a folder should be", encoding="utf-8")
    done = bz(folder, "train", "--checkpoint-dir", "blocker/ckpt").expect(2)
    assert done.stderr.count("\n") == 1
    assert "cannot write checkpoints there" in done.stderr
    assert not (folder / SETUP_MARKER).exists(), "setup() must not run first"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_checkpoint_folder_exits_2_before_setup_runs(tmp_path: Path) -> None:
    folder = _project(tmp_path / "run")
    (folder / "ro").mkdir(mode=0o500)
    done = bz(folder, "train", "--checkpoint-dir", "ro").expect(2)
    assert "Permission denied" in done.stderr
    assert not (folder / SETUP_MARKER).exists()


@pytest.mark.parametrize(
    ("failing", "lost"),
    [("epoch-0002.pt,epoch-0003.pt", 2), ("*", 5)],
    ids=["disk-full-mid-run", "every-write-fails"],
)
def test_lost_checkpoints_are_logged_training_goes_on_and_the_exit_is_1(
    tmp_path: Path, failing: str, lost: int
) -> None:
    folder = _project(tmp_path / "run")
    done = bz(folder, "train", BZ_TEST_FAIL=failing).expect(1)
    assert f"bz: error: {lost} checkpoint(s) could not be written" in done.stderr
    assert "trained 4 epoch(s)" in done.stderr, "training itself finished"
    json_done = train(_project(tmp_path / "json"), BZ_TEST_FAIL=failing).expect(1)
    failures = json_done.events("checkpoint_write_failed") + json_done.events("model_write_failed")
    assert len(failures) == lost
    assert all("No space left on device" in e["error"] for e in failures)


# -- 5. a checkpoint that verifies but does not fit -------------------------------------------


def _damage_shapes(payload: dict[str, Any]) -> None:
    payload["model"]["0.weight"] = torch.zeros(3, 3)


def _drop_rng(payload: dict[str, Any]) -> None:
    del payload["rng"]["epoch_start"]


@pytest.mark.parametrize("damage", [_damage_shapes, _drop_rng], ids=["shapes", "rng"])
def test_an_inconsistent_checkpoint_falls_back_to_the_previous_one_with_one_line(
    tmp_path: Path,
    damage: Callable[[dict[str, Any]], None],
    clean: Callable[[int], dict[str, torch.Tensor]],
) -> None:
    folder = _project(tmp_path / "run", epochs=2)
    train_here(folder).expect(0)
    newest = run_dir(folder) / "epoch-0002.pt"
    payload: dict[str, Any] = dict(read_checkpoint(newest))
    damage(payload)
    atomic_save(payload, newest)  # verified: bz's own sidecar and checksum

    done = train_here(folder, "--epochs", "3").expect(0)
    (line,) = done.events("checkpoint_unusable")
    assert line["path"] == str(newest)
    assert done.events("resumed")[0]["epoch"] == 1
    assert_same_weights(model_weights(run_dir(folder) / FINAL_MODEL), clean(3))


# -- 6. mid-epoch Ctrl-C, then fewer epochs --------------------------------------------------


def test_ctrl_c_mid_epoch_then_epochs_1_labels_and_completes_it(
    tmp_path: Path, clean: Callable[[int], dict[str, torch.Tensor]]
) -> None:
    folder = _project(tmp_path / "run")
    at = BATCHES_PER_EPOCH + 4  # 4 batches into the second epoch
    train(folder, BZ_TEST_SIGNAL="INT", BZ_TEST_SIGNAL_AT_STEP=str(at)).expect(130)

    done = train_here(folder, "--epochs", "1").expect(0)
    assert done.events("epoch_finished") == []
    (saved,) = done.events("model_saved")
    assert (saved["epoch"], saved["batch"], saved["step"]) == (1, 4, at)
    report = json.loads(validate(folder).expect(0).stdout)
    assert (report["epoch"], report["batch"], report["step"]) == (1, 4, at)
    again = here(folder, "train", "--epochs", "1").expect(0)
    assert "nothing to train" in again.stderr
    # Raising epochs again resumes from that very step, bit-identical to a clean run.
    train_here(folder).expect(0)
    assert_same_weights(model_weights(run_dir(folder) / FINAL_MODEL), clean(4))


# -- numbering ----------------------------------------------------------------------------------


def test_console_events_checkpoint_names_and_model_pt_number_epochs_alike(
    tmp_path: Path, reference: Callable[[str], tuple[Any, ...]]
) -> None:
    folder = _project(tmp_path / "run", ["console_out", STOPS])
    done = train(folder).expect(0)
    finished = [e["epoch"] for e in done.events("epoch_finished")]
    assert finished == [1, 2]
    console = [line for line in done.stderr.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in console] == ["1/4", "2/4"]
    (stop,) = done.events("early_stopping_stop")
    assert (stop["epoch"], stop["best_epoch"]) == (2, 1)
    (restored,) = done.events("early_stopping_restored")
    assert restored["epoch"] == 1
    saved = [Path(e["path"]).name for e in done.events("checkpoint_saved")]
    assert saved == ["epoch-0001.pt", "epoch-0002.pt"]
    assert [e["epoch"] for e in done.events("checkpoint_saved")] == [1, 2]
    assert done.events("stop_requested")[0]["epoch"] == 2
    assert read_checkpoint(run_dir(folder) / FINAL_MODEL, model_only=True)["epoch"] == 2

"""The run's lock and forked ``DataLoader`` workers.

``flock`` belongs to the open file, and a fork shares it: a ``DataLoader`` worker forked
while the run was locked kept it locked after ``fit`` returned (``persistent_workers``,
or a ``StatefulDataLoader`` whose iterator the loader keeps), so fitting the same setup
again to train further, as a notebook does, was refused: "another bz process (pid ? on
?) is training this run". Workers of a killed training process kept it locked the same
way until they noticed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bz
from bz.training.checkpoint.lock import RunLock

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="forked workers")


def test_fitting_the_same_setup_again_resumes_while_its_workers_live(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(32, 4, generator=generator), torch.randint(0, 2, (32,))
    model = nn.Linear(4, 2)
    loader = DataLoader(
        TensorDataset(inputs, targets),
        batch_size=8,
        num_workers=1,
        persistent_workers=True,
        multiprocessing_context="fork",
    )
    setup = bz.TrainingSetup(
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_loader=loader,
    )
    first = bz.Trainer().fit(
        setup, bz.RunConfig(epochs=1, device="cpu", plugins=[]), [], checkpoint_dir=tmp_path
    )
    assert first.epochs_completed == 1
    again = bz.Trainer().fit(
        setup, bz.RunConfig(epochs=2, device="cpu", plugins=[]), [], checkpoint_dir=tmp_path
    )
    assert again.resumed_from is not None
    assert again.epochs_completed == 2


HOLDER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from bz.training.checkpoint.lock import RunLock

    RunLock(Path(sys.argv[1])).acquire()
    child = os.fork()
    if child == 0:  # a worker: lives on after its parent (off the test's pipes)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 1)
        os.dup2(null, 2)
        time.sleep(60)
        os._exit(0)
    print(child, flush=True)
    os._exit(0)  # killed: nothing released
    """
)


def test_a_dead_process_s_forked_worker_does_not_hold_the_run(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", HOLDER, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    worker = int(done.stdout)
    try:
        lock = RunLock(tmp_path)
        lock.acquire()  # raised RunLocked while the worker lived
        lock.release()
    finally:
        os.kill(worker, signal.SIGKILL)

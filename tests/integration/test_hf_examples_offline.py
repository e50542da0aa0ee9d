"""The Hugging Face examples download nothing.

README: "`examples/hf_text_classification` and `examples/causal_lm` (`pip install
"bz-cli[hf]"`, nothing downloaded)". Each runs ``bz train --smoke`` as a user would,
with the Hub switched off (``HF_HUB_OFFLINE``) and an empty Hugging Face home: the run
succeeds, so nothing needed the network, and the home stays empty, so nothing was
fetched or cached.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("transformers")

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("example", ["hf_text_classification", "causal_lm"])
def test_the_example_trains_offline_with_an_empty_hugging_face_home(
    tmp_path: Path, example: str
) -> None:
    folder = tmp_path / example
    shutil.copytree(REPO_ROOT / "examples" / example, folder)
    home = tmp_path / "hf-home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BZ_", "HF_"))}
    env |= {
        "PYTHONPATH": str(REPO_ROOT),
        "HF_HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "bz", "train", "--smoke", "--device", "cpu"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # a safety net for a hung run, not a timing assertion
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert list(home.iterdir()) == []

"""A training stage killed with SIGKILL under Luigi resumes from its ``<key>.resume/`` checkpoint and ends with the
weights of an uninterrupted run (the function-level resume of every trained stage is in test_training_engine)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, run_cli

from data.artifacts import MODEL_WEIGHTS, PROVENANCE, RESUME_CHECKPOINT, RESUME_SUFFIX

pytestmark = pytest.mark.slow
TRAIN_CAM = [sys.executable, "-m", "luigi", "--module", "pipeline", "TrainCAM", "--no-lock",
             "--TrainCAM-num-epochs", "6"]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), LUIGI_CONFIG_PATH=str(REPO / "configs" / "tiny.cfg"))


def _kill_once_checkpointed(cwd) -> None:
    """Run TrainCAM and SIGKILL it as soon as its first resume checkpoint exists."""
    proc = subprocess.Popen(TRAIN_CAM, cwd=cwd, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if list((cwd / "work" / "TrainCAM").glob(f"*{RESUME_SUFFIX}/{RESUME_CHECKPOINT}")):
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "TrainCAM finished before its first checkpoint could be killed"


def test_killed_train_cam_resumes_to_the_uninterrupted_weights(tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    for cwd in (clean, killed):
        cwd.mkdir()
    run_cli(TRAIN_CAM, clean)

    _kill_once_checkpointed(killed)
    stage = killed / "work" / "TrainCAM"
    assert not [p for p in stage.iterdir() if p.is_dir() and "." not in p.name], "no complete-looking directory"

    run_cli(TRAIN_CAM, killed)
    (want,) = (clean / "work" / "TrainCAM").glob(f"*/{MODEL_WEIGHTS}")
    (got,) = stage.glob(f"*/{MODEL_WEIGHTS}")
    assert want.parent.name == got.parent.name, "same key"
    assert not list(stage.glob(f"*{RESUME_SUFFIX}")), "the checkpoint goes once the model is published"
    metrics = json.loads((got.parent / PROVENANCE).read_text())["metrics"]
    assert 0 < metrics["resumed_from"] < metrics["steps"], "the rerun continued from the checkpoint"
    expected = torch.load(want, weights_only=True)
    resumed = torch.load(got, weights_only=True)
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)

"""The commands a user types, from a directory that is not the checkout (no ``./luigi.cfg``, no preset chosen, as
after ``pip install -e .``): every failure exits non-zero with its error, whatever the scheduler flags, and
nothing tries to reach a central scheduler unless asked to."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import run_cli

SCHEDULER_ATTEMPT = ("RPCError", "8082", "remote scheduler")
LUIGI = [sys.executable, "-m", "luigi", "--module", "pipeline", "FullWSSS", "--no-lock"]
SCHEDULING_ERROR = 35   # luigi.cfg [retcode]


def run_anywhere(tmp_path, args: list[str]) -> subprocess.CompletedProcess:
    cwd = tmp_path / "elsewhere"
    cwd.mkdir(exist_ok=True)
    proc = run_cli(args, cwd, env_extra={"LUIGI_CONFIG_PATH": None}, check=False, timeout=300)
    assert not any(s in proc.stdout + proc.stderr for s in SCHEDULER_ATTEMPT), proc.stderr[-3000:]
    assert not (cwd / "work").exists(), "a failure while scheduling computes nothing"
    return proc


@pytest.mark.parametrize("scheduler", [[], ["--local-scheduler"], ["--workers", "2"]])
def test_a_bad_value_fails_scheduling_with_a_nonzero_exit(tmp_path, scheduler):
    proc = run_anywhere(tmp_path, LUIGI + scheduler + ["--TrainCAM-freeze-bn", "maybe"])
    assert proc.returncode == SCHEDULING_ERROR, proc.stderr[-3000:]
    assert "cannot interpret 'maybe' as boolean" in proc.stderr


def test_a_value_out_of_range_names_the_knob(tmp_path):
    proc = run_anywhere(tmp_path, [*LUIGI, "--EvalCAM-bg-threshold", "7"])
    assert proc.returncode == SCHEDULING_ERROR and "bg_threshold" in proc.stderr, proc.stderr[-3000:]


def test_an_unknown_flag_is_refused(tmp_path):
    proc = run_anywhere(tmp_path, [*LUIGI, "--TrainCAM-no-such-knob", "1"])
    assert proc.returncode != 0 and "--TrainCAM-no-such-knob" in proc.stderr, proc.stderr[-3000:]


def test_the_cache_commands_work_from_anywhere(tmp_path):
    proc = run_anywhere(tmp_path, [sys.executable, "-m", "pipeline", "status"])
    assert proc.returncode == 0 and "would run:" in proc.stdout, proc.stderr[-3000:]
    proc = run_anywhere(tmp_path, [sys.executable, "-m", "pipeline", "clean", "--stage", "NoSuchStage"])
    assert proc.returncode == 2 and "NoSuchStage" in proc.stderr

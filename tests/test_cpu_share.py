"""Threads per task from the number of tasks computing on the host (``pipeline.devices.cpu_share``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import stages.runtime
from pipeline import devices
from pipeline.devices import CPU_SHARE_PREFIX, cpu_share
from pipeline.framework import task_threads
from stages.config import RuntimeConfig
from stages.runtime import rebalance_threads, thread_policy
from tests.test_training_engine import toy_run

ROOT = Path(__file__).resolve().parent.parent
HOLDER = """
import sys, time
from pipeline.devices import cpu_share
with cpu_share(sys.argv[1], cores=4):
    print("holding", flush=True)
    time.sleep(120)
"""


def start_holder(lock_dir: Path) -> subprocess.Popen:
    """Another task's process holding a share until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_dir)], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "holding"
    return proc


def shares(lock_dir: Path) -> list[str]:
    return sorted(p.name for p in lock_dir.glob(CPU_SHARE_PREFIX + "*"))


def test_a_lone_task_gets_every_core_and_leaves_no_file(tmp_path):
    with cpu_share(tmp_path, cores=4) as share:
        assert (share.running(), share.threads()) == (1, 4)
        assert len(shares(tmp_path)) == 1
    assert shares(tmp_path) == [] and list(tmp_path.iterdir()) == []


def test_tasks_split_the_cores_and_a_killed_one_gives_its_share_back(tmp_path):
    holder = start_holder(tmp_path)
    try:
        with cpu_share(tmp_path, cores=4) as share:
            assert (share.running(), share.threads()) == (2, 2)
            with cpu_share(tmp_path, cores=4) as third:  # a second task in this process counts too
                assert third.threads() == 1  # 4 // 3
            holder.send_signal(signal.SIGKILL)
            holder.wait(30)
            assert len(shares(tmp_path)) == 2  # the killed task's file stays behind...
            assert (share.running(), share.threads()) == (1, 4)
            assert len(shares(tmp_path)) == 1  # ...until a count finds its lock free and removes it
    finally:
        holder.kill()


def test_the_running_task_takes_a_smaller_share_when_another_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "host_cores", lambda: 4)
    monkeypatch.setattr(stages.runtime, "REBALANCE_EVERY_S", 0.0)
    before = torch.get_num_threads()
    record: dict = {}
    with task_threads(RuntimeConfig(torch_threads=0, gpu_lock_dir=str(tmp_path)), record):
        assert torch.get_num_threads() == 4
        holder = start_holder(tmp_path)
        try:
            rebalance_threads()
            assert torch.get_num_threads() == 2
        finally:
            holder.kill()
            holder.wait(30)
        rebalance_threads()
        assert torch.get_num_threads() == 4
    assert record == {"torch_threads": [2, 4]} and torch.get_num_threads() == before


def test_cores_an_input_pipeline_keeps_busy_are_left_to_it(tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "host_cores", lambda: 4)
    record: dict = {}
    with task_threads(RuntimeConfig(torch_threads=0, gpu_lock_dir=str(tmp_path)), record, reserved=1):
        assert torch.get_num_threads() == 3
    with cpu_share(tmp_path, cores=2) as share:
        assert share.threads(reserved=1) == 1 and share.threads(reserved=5) == 1  # never below one thread
    from pipeline.tasks import PretrainBackbone, TrainCAM
    assert (PretrainBackbone.input_cores, TrainCAM.input_cores) == (1, 0)


def test_a_fixed_thread_count_is_kept_and_recorded(tmp_path):
    record: dict = {}
    with task_threads(RuntimeConfig(torch_threads=1, gpu_lock_dir=str(tmp_path)), record):
        assert torch.get_num_threads() == 1
        assert shares(tmp_path) == []
    assert record == {"torch_threads": [1]}


def test_the_training_loop_rebalances_at_every_step(monkeypatch):
    monkeypatch.setattr(stages.runtime, "REBALANCE_EVERY_S", 0.0)
    calls = []
    with thread_policy(lambda: calls.append(time.monotonic()) or 1):
        toy_run(None)
    assert len(calls) == 1 + 6  # once on entry, then after each of the toy run's 6 steps


@pytest.mark.parametrize("loose", [0o755, 0o777])
def test_the_share_directory_must_be_private(tmp_path, loose):
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir(mode=0o700)
    lock_dir.chmod(loose)
    with pytest.raises(devices.UnsafeLockError, match="mode"), cpu_share(lock_dir):
        pass

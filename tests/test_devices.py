"""The per-host GPU allocator on a fake 2-GPU host: disjoint devices, waiting, timeouts, dead holders."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import luigi
import pytest
import torch
from conftest import run_luigi

from pipeline import devices
from pipeline.devices import GPUAllocationTimeoutError, allocate, assigned_gpus, detect_gpus

FAKE_HOST = ["0", "1"]  # what [wsss] gpus = "0,1" gives


def test_concurrent_allocations_are_disjoint_and_a_third_times_out(tmp_path):
    first = allocate(1, tmp_path, timeout=1, devices=FAKE_HOST)
    second = allocate(1, tmp_path, timeout=1, devices=FAKE_HOST)
    assert sorted(first.devices + second.devices) == FAKE_HOST
    started = time.monotonic()
    with pytest.raises(GPUAllocationTimeoutError, match=r"no 1 free GPU\(s\) among 0,1 after 0.5 s") as err:
        allocate(1, tmp_path, timeout=0.5, devices=FAKE_HOST)
    assert time.monotonic() - started >= 0.5, "it waited for the timeout"
    assert str(tmp_path) in str(err.value) and f"pid {os.getpid()}" in str(err.value), "names the lock dir and holder"
    first.release()
    second.release()


def test_a_waiter_gets_the_device_as_soon_as_it_is_released(tmp_path):
    both = allocate(2, tmp_path, timeout=1, devices=FAKE_HOST)
    threading.Timer(0.4, both.release).start()
    started = time.monotonic()
    with allocate(2, tmp_path, timeout=10, devices=FAKE_HOST) as again:
        assert sorted(again.devices) == FAKE_HOST
    assert 0.3 < time.monotonic() - started < 5


def test_more_gpus_than_the_host_has_fails_at_once(tmp_path):
    with pytest.raises(ValueError, match="needs 3 GPU.*offers 2"):
        allocate(3, tmp_path, timeout=60, devices=FAKE_HOST)


def _hold_and_wait(lock_dir: str, ready, mode: str) -> None:
    allocate(2, lock_dir, timeout=5, devices=FAKE_HOST)
    ready.set()
    if mode == "exit":
        os._exit(0)  # no release, no cleanup: only the kernel drops the locks
    time.sleep(60)


@pytest.mark.parametrize("mode", ["exit", "kill"])
def test_a_dead_holder_releases_its_devices(tmp_path, mode):
    ctx = multiprocessing.get_context("fork")  # as Luigi's --workers > 1 runs each task
    ready = ctx.Event()
    child = ctx.Process(target=_hold_and_wait, args=(str(tmp_path), ready, mode))
    child.start()
    try:
        assert ready.wait(10)
        if mode == "kill":
            with pytest.raises(GPUAllocationTimeoutError):
                allocate(1, tmp_path, timeout=0.3, devices=FAKE_HOST)
            os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        with allocate(2, tmp_path, timeout=5, devices=FAKE_HOST) as taken:
            assert sorted(taken.devices) == FAKE_HOST
    finally:
        if child.is_alive():
            child.kill()


def test_detection_reads_the_setting_then_cuda_visible_devices_then_nvidia_smi(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert detect_gpus() == ["2", "3"]
    assert detect_gpus("0,1") == ["0", "1"], "[wsss] gpus wins"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f2a,1,-1,2")
    assert detect_gpus() == ["GPU-8f2a", "1"], "CUDA stops at the first invalid id"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert detect_gpus() == []
    with pytest.raises(ValueError, match=r"\[wsss\] gpus"):
        detect_gpus("0,0")

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    fake_smi = tmp_path / "nvidia-smi"
    fake_smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-a)'\necho 'GPU 1: NVIDIA H100 (UUID: GPU-b)'\n")
    fake_smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    devices._nvidia_smi_indices.cache_clear()
    assert detect_gpus() == ["0", "1"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    devices._nvidia_smi_indices.cache_clear()
    assert detect_gpus() == []
    devices._nvidia_smi_indices.cache_clear()


def test_assigned_devices_reach_subprocesses_and_the_variable_is_restored(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    with assigned_gpus(1, "0,1", str(tmp_path), timeout=1) as allocation:
        assert os.environ["CUDA_VISIBLE_DEVICES"] == allocation.visible_devices
        seen = subprocess.run([sys.executable, "-c", "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        assert seen == allocation.visible_devices  # what torchrun and its ranks would see
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "7"


def test_gpu_resources_are_declared_only_when_the_run_uses_cuda(luigi_config, monkeypatch):
    from pipeline.tasks import ExtractSeedsShard, MakeCAM, MakeCAMShard, PrepareDataset, TrainCAM

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # a CPU-only host
    luigi_config("wsss", "device", "auto")
    assert TrainCAM().resources == {} and MakeCAMShard(shard=0, n_shards=1, stage_key="k").resources == {}
    luigi_config("wsss", "gpus", "0,1")  # a 2-GPU host
    assert TrainCAM().resources == {"gpu": 1}
    assert MakeCAMShard(shard=0, n_shards=1, stage_key="k").resources == {"gpu": 1}
    assert PrepareDataset().resources == {} and MakeCAM().resources == {}, "CPU stages and joins take no GPU"
    assert ExtractSeedsShard(shard=0, n_shards=1, stage_key="k").resources == {}
    luigi_config("wsss", "train_processes", 2)
    assert TrainCAM().resources == {"gpu": 2}, "one device per DDP rank"
    luigi_config("wsss", "device", "cpu")
    assert TrainCAM().resources == {}
    luigi_config("wsss", "device", "auto")
    luigi_config("wsss", "submit_stages", "TrainCAM")
    assert TrainCAM().resources == {}, "a submitted stage holds no GPU of the submitting host"


def test_scheduling_and_running_on_cpu_never_initialises_cuda(luigi_config, tmp_path, monkeypatch):
    """A fake 2-GPU host (gpus = 0,1) on a CPU build: the GPU stage takes a device lock, records it, and
    nothing in the scheduler or the stage initialises CUDA (the scheduler must stay safe to fork)."""
    from pipeline.tasks import PretrainBackbone

    calls = []
    monkeypatch.setattr(torch.cuda, "_lazy_init", lambda: calls.append("lazy_init"))
    monkeypatch.setattr(torch.cuda, "init", lambda: calls.append("init"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    lock_dir = tmp_path / "locks"
    luigi_config("wsss", "gpus", "0,1")
    luigi_config("wsss", "gpu_lock_dir", lock_dir)
    luigi_config("wsss", "device", "auto")
    result = run_luigi(PretrainBackbone())
    assert result.status == luigi.LuigiStatusCode.SUCCESS, result.summary_text
    assert not calls and not torch.cuda.is_initialized()
    provenance = json.loads((PretrainBackbone().stage_dir / "provenance.json").read_text())
    assert provenance["gpus"] in (["0"], ["1"])
    assert (lock_dir / f"gpu{provenance['gpus'][0]}.lock").is_file()
    assert "CUDA_VISIBLE_DEVICES" not in os.environ, "the task's devices do not leak into the scheduler"
    with allocate(2, lock_dir, timeout=1, devices=FAKE_HOST):
        pass  # the finished task released its lock


# ------------------------------------------------------------------ lock safety (issue 15)

def test_the_lock_dir_is_created_private(tmp_path):
    lock_dir = tmp_path / "locks" / "wsss"
    with allocate(1, lock_dir, 1, FAKE_HOST):
        assert stat.S_IMODE(lock_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE((lock_dir / "gpu0.lock").stat().st_mode) == 0o600


@pytest.mark.parametrize("plant", ["open_mode", "other_owner", "symlinked_dir"])
def test_an_unsafe_lock_dir_is_refused_naming_it(tmp_path, monkeypatch, plant):
    lock_dir = tmp_path / "locks"
    if plant == "open_mode":
        lock_dir.mkdir(mode=0o700)
        lock_dir.chmod(0o777)
        problem = "mode 0777"
    elif plant == "other_owner":
        lock_dir.mkdir(mode=0o700)
        uid = os.getuid()
        monkeypatch.setattr(devices.os, "getuid", lambda: uid + 1)
        problem = "not to you"
    else:
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        lock_dir.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
        problem = "not a directory"
    with pytest.raises(devices.UnsafeLockError, match=f"{lock_dir}.*{problem}"):
        allocate(1, lock_dir, 1, FAKE_HOST)


def test_a_planted_symlink_or_hard_link_is_never_followed_or_truncated(tmp_path):
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir(mode=0o700)
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n" * 40)
    (lock_dir / "gpu0.lock").symlink_to(victim)
    with pytest.raises(devices.UnsafeLockError, match="gpu0.lock"):
        allocate(1, lock_dir, 1, ["0"])
    (lock_dir / "gpu0.lock").unlink()
    os.link(victim, lock_dir / "gpu0.lock")
    with pytest.raises(devices.UnsafeLockError, match="gpu0.lock"):
        allocate(1, lock_dir, 1, ["0"])
    assert victim.read_text() == "keep me\n" * 40


def test_a_lock_file_is_never_truncated(tmp_path):
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir(mode=0o700)
    lock = lock_dir / "gpu0.lock"
    lock.write_bytes(b"x" * 500)
    with allocate(1, lock_dir, 1, ["0"]):
        assert lock.stat().st_size == 500
        assert lock.read_bytes().startswith(f"pid {os.getpid()} ".encode())

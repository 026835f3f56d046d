"""Multi-process (DDP) helpers: ranks from torchrun's environment, the process group, and the launcher.

A training stage that runs under ``torchrun`` calls :func:`init_distributed` first; everything else here
degrades to the one-process case when no process group is initialised, so the same stage code serves both.
:func:`launch_torchrun` is the parent side: it runs a stage module under ``torch.distributed.run`` in the
same interpreter (``sys.executable``), with its output streamed to a log file.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

from data.io import log_tail
from stages.runtime import resolve_device

REPO_ROOT = Path(__file__).resolve().parent.parent
LOG_TAIL_CHARS = 4000


@dataclass(frozen=True)
class Ranks:
    """Where this process sits in the job (``rank 0 of 1`` outside torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def ranks_from_env() -> Ranks:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun exports them; defaults describe a single process."""
    ranks = Ranks(rank=_env_int("RANK", 0), world_size=_env_int("WORLD_SIZE", 1),
                  local_rank=_env_int("LOCAL_RANK", 0))
    if ranks.world_size < 1 or not 0 <= ranks.rank < ranks.world_size or ranks.local_rank < 0:
        raise ValueError(f"inconsistent distributed environment: {ranks}")
    return ranks


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device_name: str = "auto") -> torch.device:
    """Join the process group torchrun set up and return this rank's device.

    CUDA ranks use NCCL and the GPU ``LOCAL_RANK`` of the visible set; CPU ranks use gloo. Outside torchrun
    nothing is initialised and the device is simply ``resolve_device(device_name)``.
    """
    device = resolve_device(device_name)
    if not launched_by_torchrun() or dist.is_initialized():
        return device
    ranks = ranks_from_env()
    if device.type == "cuda":
        if device.index is not None and ranks.world_size > 1:
            raise ValueError(f"device {device_name!r}: under torchrun each rank takes GPU LOCAL_RANK; choose GPUs "
                             "with CUDA_VISIBLE_DEVICES and set device = cuda")
        if ranks.local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"rank {ranks.rank} needs GPU {ranks.local_rank} (LOCAL_RANK) but only "
                               f"{torch.cuda.device_count()} are visible (CUDA_VISIBLE_DEVICES="
                               f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); give the job one GPU per process")
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=ranks.rank, world_size=ranks.world_size, device_id=device)
    else:
        dist.init_process_group("gloo", rank=ranks.rank, world_size=ranks.world_size)
    return device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def all_reduce_mean(value: float, device: torch.device | None = None) -> float:
    """Mean of ``value`` over all ranks (``value`` itself in one process)."""
    if not is_distributed():
        return float(value)
    # NCCL reduces CUDA tensors only; gloo wants CPU ones.
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
            else torch.device("cpu")
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item()) / dist.get_world_size()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def teardown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def exit_rank(status: int = 0) -> NoReturn:
    """End a torchrun rank now, without interpreter finalisation.

    The gloo group's worker threads can outlive :func:`teardown` (a core dump of the failure shows them still
    running). Once the main thread starts finalising, such a thread that drops the last reference to a tensor
    asks for the GIL, is made to exit instead, and that exit inside a C++ destructor is std::terminate: SIGABRT,
    and torchrun fails a run whose every file is already in place (seen in CI, and in 2 of 23 runs of the
    two-process test on a loaded 2-core machine; none in 60 since). Call this only after :func:`teardown` and
    the final barrier.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(status)


def launch_torchrun(nproc: int, module: str, args: Sequence[str], env: dict[str, str] | None,
                    log_path: str | os.PathLike, threads_per_process: int = 0,
                    on_line: Callable[[str], None] | None = None) -> None:
    """Run ``python -m <module> <args>`` as ``nproc`` ranks under torchrun; stdout and stderr go to ``log_path``.

    ``env`` adds to (and overrides) this process's environment. OMP_NUM_THREADS is always set: to
    ``threads_per_process`` when positive, else to the CPU count shared out between the ranks (torchrun
    would otherwise force 1 with a warning). The repository is prepended to PYTHONPATH so the ranks import
    exactly this code. Each output line is also handed to ``on_line`` as it arrives (e.g. to forward progress
    to Luigi). A non-zero exit raises RuntimeError naming the log and quoting its tail.
    """
    if nproc < 1:
        raise ValueError(f"launch_torchrun: nproc must be at least 1, got {nproc}")
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    child_env = dict(os.environ)
    child_env.update(env or {})
    threads = threads_per_process if threads_per_process > 0 else max(1, (os.cpu_count() or 1) // nproc)
    child_env["OMP_NUM_THREADS"] = str(threads)
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), child_env.get("PYTHONPATH", "")) if p)
    # --standalone: a private rendezvous on a free port, so concurrent launches on one host never collide.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", module, *map(str, args)]
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env, text=True,
                                errors="replace", bufsize=1)
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if on_line:
                    on_line(line.rstrip("\n"))
            returncode = proc.wait()
        except BaseException:
            # Interrupted (Ctrl-C, worker timeout): SIGTERM lets torchrun stop its ranks; never leave orphans.
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
    if returncode != 0:
        raise RuntimeError(f"torchrun ({nproc} processes) of {module} exited with status {returncode}; "
                           f"full log: {log_path}\n--- log tail ---\n{log_tail(log_path, LOG_TAIL_CHARS)}")

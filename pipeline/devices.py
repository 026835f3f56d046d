"""Host-local GPU allocation (which CUDA devices a task may use) and each task's share of the CPU cores.

Luigi's ``[resources] gpu = N`` is a counter: it bounds how many GPU tasks run at once but never says
*which* device a task gets. This module picks the devices. Each device has a lock file ``gpu<id>.lock`` in
a private per-user directory (0700, checked: never a symlink, another user's or a shared one; lock files are opened
without following links and never truncated); a task takes ``n`` of them with non-blocking ``fcntl.flock`` and
holds them for its lifetime. The kernel drops a flock when its holder dies (even on ``kill -9``), so a crashed
task never leaves a device reserved. Locks are per host: they coordinate every Luigi invocation on one machine.

The chosen ids reach the task as ``CUDA_VISIBLE_DEVICES`` (inherited by torchrun and other
subprocesses). Nothing here initialises CUDA: detection reads ``CUDA_VISIBLE_DEVICES`` or asks
``nvidia-smi -L``, so the scheduling process stays safe to fork.

CPU cores (:func:`cpu_share`): why not a fixed thread count per task? Luigi runs as many tasks at once as it has
workers, but the demo's chain is mostly a line: ``PretrainBackbone`` ran alone on one thread for a fifth of the
demo while the second core idled, and two tasks on the default thread count each would fight over two cores.
So every computing task holds a lock file ``cpu-share-*.lock`` in the same private directory, and its threads are
``cores // tasks holding one``, re-read while it runs (:func:`stages.runtime.rebalance_threads`). Liveness is the
flock again: a file whose lock can be taken belongs to a dead task and is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from functools import cache
from pathlib import Path

VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
POLL_S = 0.2


class GPUAllocationTimeoutError(RuntimeError):
    """Not enough free devices within the allowed wait."""


def parse_gpus(spec: str, key: str = "[wsss] gpus") -> list[str]:
    """``"0,1,3"`` -> ``["0", "1", "3"]``; ids may also be GPU UUIDs, as in ``CUDA_VISIBLE_DEVICES``."""
    ids = [part.strip() for part in spec.split(",") if part.strip()]
    for device_id in ids:
        if not re.fullmatch(r"[A-Za-z0-9-]+", device_id):
            raise ValueError(f"{key} = {spec!r}: {device_id!r} is not a device index or UUID")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{key} = {spec!r} lists a device twice")
    return ids


def _visible_from_env(value: str) -> list[str]:
    # CUDA stops at the first invalid entry ("-1" is the usual way to hide every device).
    ids = []
    for part in (p.strip() for p in value.split(",")):
        if not part or part.startswith("-"):
            break
        ids.append(part)
    return ids


@cache
def _nvidia_smi_indices() -> tuple[str, ...]:
    """Device indices listed by ``nvidia-smi -L`` (a separate process: this one never touches CUDA)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return ()
    try:
        listing = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(re.findall(r"^GPU (\d+):", listing, flags=re.MULTILINE))


def detect_gpus(spec: str = "") -> list[str]:
    """The devices this host offers: ``spec`` if given, else ``CUDA_VISIBLE_DEVICES``, else ``nvidia-smi -L``."""
    if spec.strip():
        return parse_gpus(spec)
    if VISIBLE_DEVICES in os.environ:
        return _visible_from_env(os.environ[VISIBLE_DEVICES])
    return list(_nvidia_smi_indices())


def default_lock_dir() -> Path:
    """Per user, so two users on one host never share (or block on) each other's lock files."""
    return Path(tempfile.gettempdir()) / f"wsss-gpu-locks-{getpass.getuser()}"


def _lock_name(device_id: str) -> str:
    return f"gpu{device_id}.lock"


class Allocation:
    """Devices held by this process until :meth:`release` (or the end of a ``with`` block)."""

    def __init__(self, devices: list[str], handles: list[int]):
        self.devices = devices
        self._handles = handles

    @property
    def visible_devices(self) -> str:
        return ",".join(self.devices)

    def release(self) -> None:
        for fd in self._handles:
            os.close(fd)  # closing the last descriptor drops the flock
        self._handles = []

    def __enter__(self) -> Allocation:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Allocation(devices={self.devices})"


HOLDER_NOTE_BYTES = 64   # the holder note is written in place at a fixed width: a lock file is never truncated


class UnsafeLockError(RuntimeError):
    """The lock directory or a lock file could let another user interfere (plant links, hold our devices)."""


def prepare_lock_dir(lock_dir: Path) -> None:
    """Create ``lock_dir`` private (0700) and refuse one that is a symlink, not ours, or open to group or others:
    anyone who can open a lock file can hold the device, and anyone who can write the folder can plant links."""
    try:
        lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(lock_dir)
    except OSError as err:
        raise UnsafeLockError(f"GPU lock directory {lock_dir}: cannot create it ({err})") from None
    problem = None
    if not stat.S_ISDIR(st.st_mode):
        problem = "is not a directory (a symlink?)"
    elif st.st_uid != os.getuid():
        problem = f"belongs to uid {st.st_uid}, not to you (uid {os.getuid()})"
    elif st.st_mode & 0o077:
        problem = f"has mode {stat.S_IMODE(st.st_mode):04o}; other users could hold or replace its locks"
    if problem:
        raise UnsafeLockError(f"GPU lock directory {lock_dir} {problem}; remove it or make it your own with "
                              f"mode 0700 (chmod 700), or set [wsss] gpu_lock_dir")


def _open_lock(path: Path) -> int:
    """The lock file, opened without following a symlink and checked to be a plain file of ours, unshared."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as err:  # ELOOP: a symlink was planted there
        raise UnsafeLockError(f"GPU lock file {path}: refusing to open it ({err})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_nlink != 1:
        os.close(fd)
        raise UnsafeLockError(f"GPU lock file {path} is not a plain, unlinked file of yours; remove it")
    return fd


def _try_lock(path: Path) -> int | None:
    fd = _open_lock(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    # Who holds it, for the timeout message of whoever waits next.
    note = f"pid {os.getpid()} since {time.strftime('%H:%M:%S')}"
    os.pwrite(fd, (note.ljust(HOLDER_NOTE_BYTES - 1) + "\n").encode(), 0)
    return fd


def _holders(lock_dir: Path, devices: Sequence[str]) -> str:
    notes = []
    for device_id in devices:
        try:
            with open(lock_dir / _lock_name(device_id), "rb") as fh:
                note = fh.read(HOLDER_NOTE_BYTES).decode(errors="replace").strip()
        except OSError:
            note = ""
        notes.append(f"gpu{device_id}: {note or 'held'}")
    return "; ".join(notes)


def allocate(n: int, lock_dir: str | os.PathLike | None = None, timeout: float = 600.0,
             devices: Sequence[str] | None = None, poll: float = POLL_S) -> Allocation:
    """Take ``n`` free devices of ``devices`` (default: :func:`detect_gpus`), waiting up to ``timeout`` seconds.

    Raises :class:`GPUAllocationTimeoutError` naming the holders when not enough devices free up in time, and
    ``ValueError`` when the host has fewer than ``n`` devices at all (waiting could never help).
    """
    candidates = list(detect_gpus() if devices is None else devices)
    if n < 1:
        return Allocation([], [])
    if len(candidates) < n:
        raise ValueError(f"a task needs {n} GPU(s) but this host offers {len(candidates)} "
                         f"({','.join(candidates) or 'none'}); set [wsss] gpus or CUDA_VISIBLE_DEVICES, "
                         f"or use [wsss] device = cpu")
    lock_dir = Path(lock_dir) if lock_dir else default_lock_dir()
    prepare_lock_dir(lock_dir)
    deadline = time.monotonic() + timeout
    while True:
        taken: list[tuple[str, int]] = []
        for device_id in candidates:
            fd = _try_lock(lock_dir / _lock_name(device_id))
            if fd is not None:
                taken.append((device_id, fd))
                if len(taken) == n:
                    return Allocation([d for d, _ in taken], [fd for _, fd in taken])
        # Not enough: give back what we took so two waiters cannot deadlock holding one device each.
        for _, fd in taken:
            os.close(fd)
        if time.monotonic() >= deadline:
            raise GPUAllocationTimeoutError(
                f"no {n} free GPU(s) among {','.join(candidates)} after {timeout:g} s "
                f"(lock dir {lock_dir}: {_holders(lock_dir, candidates)}). Other tasks or Luigi runs on this "
                f"host hold them; raise [wsss] gpu_wait_s, or lower [resources] gpu / --workers")
        time.sleep(poll)


# Set once CUDA is initialised in a process that runs tasks in-process (``--workers 1``): from then on
# every task of that process uses these devices, since CUDA reads CUDA_VISIBLE_DEVICES only once.
_process_pin: list[str] | None = None


def cuda_initialised() -> bool:
    """Whether this process has a CUDA context (checked without creating one)."""
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


@contextlib.contextmanager
def assigned_gpus(n: int, spec: str = "", lock_dir: str = "", timeout: float = 600.0) -> Iterator[Allocation]:
    """Hold ``n`` devices and expose them as ``CUDA_VISIBLE_DEVICES`` for the block, then restore it.

    Luigi with ``--workers > 1`` runs each task in a forked child that has not touched CUDA, so setting
    the variable there decides what torch sees. With ``--workers 1`` tasks run in the scheduling process:
    the first task that initialises CUDA fixes the visible set for good, so later tasks of that process
    wait for (and reuse) the same devices — the allocator then pins the whole process.
    """
    global _process_pin
    candidates = detect_gpus(spec)
    if _process_pin is not None and cuda_initialised():
        if n > len(_process_pin):
            raise RuntimeError(f"a task needs {n} GPU(s) but CUDA in this process was initialised with "
                               f"{','.join(_process_pin)}; run with --workers > 1 so each task gets a fresh process")
        candidates = _process_pin[:n]
    previous = os.environ.get(VISIBLE_DEVICES)
    with allocate(n, lock_dir or None, timeout, candidates) as allocation:
        os.environ[VISIBLE_DEVICES] = allocation.visible_devices
        try:
            yield allocation
        finally:
            if cuda_initialised() and _process_pin is None:
                _process_pin = allocation.devices
            if previous is None:
                os.environ.pop(VISIBLE_DEVICES, None)
            else:
                os.environ[VISIBLE_DEVICES] = previous


def will_use_cuda(device: str, spec: str = "") -> bool:
    """Whether a task run with ``[wsss] device = device`` computes on CUDA (decided without initialising it)."""
    if device == "cpu":
        return False
    if device.startswith("cuda"):
        return True
    return bool(detect_gpus(spec))  # auto: CUDA when the host has a device


# ------------------------------------------------------------------------------------------ CPU cores

CPU_SHARE_PREFIX = "cpu-share-"


def host_cores() -> int:
    """The cores this process may run on (its affinity mask: a Slurm or taskset allocation, not the whole host)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class CpuShare:
    """This process's claim on the host's cores, held from :func:`cpu_share` until the end of its block."""

    def __init__(self, lock_dir: Path, own: Path, cores: int):
        self.lock_dir = lock_dir
        self.own = own
        self.cores = cores

    def running(self) -> int:
        """Tasks holding a share now (this one included); a share nobody holds any more is removed."""
        count = 1
        for path in self.lock_dir.glob(CPU_SHARE_PREFIX + "*.lock"):
            if path != self.own and _held_by_another(path):
                count += 1
        return count

    def threads(self, reserved: int = 0) -> int:
        """This task's threads: the cores, less ``reserved`` (what its own input pipeline keeps busy), split
        evenly among the running tasks."""
        return max(1, (self.cores - reserved) // self.running())


def _held_by_another(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:  # removed meanwhile (its task ended), or a planted link: not a live share
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # its holder died (a killed task): the kernel dropped the lock, the file stayed
    return False


@contextlib.contextmanager
def cpu_share(lock_dir: str | os.PathLike | None = None, cores: int | None = None) -> Iterator[CpuShare]:
    """Hold a share of the host's cores for the block; see the module docstring."""
    lock_dir = Path(lock_dir) if lock_dir else default_lock_dir()
    prepare_lock_dir(lock_dir)
    # Locked under a name nobody counts, then renamed: a counter never sees it unlocked and removes it.
    fd, staging = tempfile.mkstemp(prefix=".staging-", suffix=".lock", dir=lock_dir)
    own = lock_dir / f"{CPU_SHARE_PREFIX}{os.getpid()}-{Path(staging).stem.rsplit('-', 1)[-1]}.lock"
    try:
        os.set_inheritable(fd, False)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(staging, own)
        yield CpuShare(lock_dir, own, cores or host_cores())
    finally:
        for path in (staging, own):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        os.close(fd)

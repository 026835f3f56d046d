"""Device choice, seeding and version facts shared by every stage."""

from __future__ import annotations

import contextlib
import hashlib
import platform
import random
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; an explicit CUDA device without CUDA is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available in this process")
    return device


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def configure_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


# Why a policy the pipeline installs rather than a number: the number of tasks sharing the host changes while a
# long stage runs, and ``torch.set_num_threads`` only takes effect for the thread that calls it, so the compute
# thread itself re-reads it at points it passes anyway (each training step, each progress report).
REBALANCE_EVERY_S = 5.0
_thread_policy: Callable[[], int] | None = None
_next_rebalance = 0.0
_threads_used: set[int] = set()


@contextlib.contextmanager
def thread_policy(threads: Callable[[], int]) -> Iterator[set[int]]:
    """Within the block, :func:`rebalance_threads` sets torch's thread count to ``threads()``; yields the set of
    counts used, filled as the block runs."""
    global _thread_policy
    before = torch.get_num_threads()
    _thread_policy = threads
    _threads_used.clear()
    rebalance_threads(now=True)
    try:
        yield _threads_used
    finally:
        _thread_policy = None
        torch.set_num_threads(before)


def rebalance_threads(now: bool = False) -> None:
    """Apply the installed policy, at most every ``REBALANCE_EVERY_S`` seconds (cheap to call per step)."""
    global _next_rebalance
    if _thread_policy is None or (not now and time.monotonic() < _next_rebalance):
        return
    _next_rebalance = time.monotonic() + REBALANCE_EVERY_S
    wanted = _thread_policy()
    _threads_used.add(wanted)
    if wanted != torch.get_num_threads():
        torch.set_num_threads(wanted)


def versions() -> dict[str, str]:
    import h5py
    import PIL

    facts = {
        "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
        "h5py": h5py.__version__, "pillow": PIL.__version__, "platform": platform.platform(),
        "cuda": torch.version.cuda or "none",
    }
    try:
        import luigi
        facts["luigi"] = luigi.__version__
    except (ImportError, AttributeError):
        pass
    return facts


def image_seed(seed: int, image_id: str) -> int:
    """A 63-bit seed from the configured seed and the image id (stable across runs, processes and hosts)."""
    digest = hashlib.sha256(f"{int(seed)}\0{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ---------------------------------------------------------------------------------------------- training

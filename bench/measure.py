"""What every per-method bench shares: peak memory of one call, and each measurement in a fresh process.

A fresh process per (method, image, variant) keeps one variant's allocator state, caches and first-call costs
out of the next one's figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakMemory:
    """Peak RSS above the level at ``start``: kernel high-water mark if resettable, else 1 ms sampling."""

    def __enter__(self) -> PeakMemory:
        self.base = _rss_kib("VmRSS") * 1024
        self.sampler = None
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.resettable = _rss_kib("VmHWM") * 1024 <= self.base + 4 * 2**20
        except OSError:
            self.resettable = False
        if not self.resettable:
            self.sampled, self.stop = self.base, threading.Event()
            process = psutil.Process()

            def sample() -> None:
                while not self.stop.wait(0.001):
                    self.sampled = max(self.sampled, process.memory_info().rss)
            self.sampler = threading.Thread(target=sample, daemon=True)
            self.sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.sampler is not None:
            self.stop.set()
            self.sampler.join()
            self.peak = self.sampled - self.base
        else:
            self.peak = _rss_kib("VmHWM") * 1024 - self.base
        self.method = "VmHWM" if self.sampler is None else "rss-sampling"


def timed_phase(phases: dict[str, float], name: str, fn: Callable) -> Callable:
    """``fn`` wrapped to record its wall time in ``phases[name]`` (the last call's), also when it raises."""
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[name] = time.perf_counter() - start
    return wrapper


def in_fresh_process(module: str, *args: str) -> dict:
    """``python -m module *args`` from the repository root; the JSON object its last stdout line prints."""
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def timed(fn: Callable[[], object], repeat: int = 1) -> float:
    """The best of ``repeat`` wall-clock timings of ``fn()``, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best

"""Sparse random walk against the dense squaring reference (IRN's ``make_sem_seg_labels``), on the CPU.

One 500x375 image: stride-4 grid 94x125 = 11,750 nodes, a boundary map with object-like contours plus
noise, a random smooth K=3 CAM, IRN's defaults (beta 10, t = 256, radius 5, bg 0.25). Each variant runs the
whole ``propagate_irn`` in a fresh subprocess, which reports wall time and the peak resident memory of
its first call above the state just before it (the kernel's high-water mark, reset through
/proc/self/clear_refs; where that is refused, a 1 ms RSS sampling thread). Figures are ratios within the
run: speed-up, memory %, label agreement %.

The dense reference does 8 squarings of an 11,750^2 matrix (~26 TFLOP): about 2.5 minutes on 2 idle cores
at ~190 GFLOP/s, longer on a shared machine. The sparse walk takes about a second.

Run alone with ``python -m bench.random_walk``; ``make bench`` includes it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.maps import smooth_cam_stack  # noqa: E402
from stages.random_walk import propagate_irn  # noqa: E402

IMAGE_SIZE = (375, 500)  # (H, W)
NUM_CLASSES = 3


def make_inputs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(stride-4 CAM (K, h, w) in [0, 1], boundary map (h, w) in [0, 1]) for IMAGE_SIZE."""
    rng = np.random.default_rng(seed)
    h, w = math.ceil(IMAGE_SIZE[0] / 4), math.ceil(IMAGE_SIZE[1] / 4)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # Boundaries: rims of a few ellipses (objects) and a couple of straight edges, blurred, plus noise.
    boundary = np.zeros((h, w), np.float32)
    for _ in range(6):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(6, h / 3), rng.uniform(6, w / 3)
        radius = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
        boundary = np.maximum(boundary, np.exp(-((radius - 1) * min(ry, rx)) ** 2 / 2))
    for _ in range(2):
        angle, offset = rng.uniform(0, np.pi), rng.uniform(-0.3, 0.3) * min(h, w)
        distance = (yy - h / 2) * np.cos(angle) + (xx - w / 2) * np.sin(angle) - offset
        boundary = np.maximum(boundary, 0.8 * np.exp(-distance ** 2 / 2))
    boundary = np.clip(boundary + rng.uniform(0, 0.15, (h, w)), 0, 1).astype(np.float32)
    return smooth_cam_stack(rng, NUM_CLASSES, h, w, max_sigma=0.25), boundary


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


def run_variant(variant: str, out_dir: Path) -> dict:
    """Inside a fresh process: peak memory of the first propagate_irn call (first-call costs included), and
    its time; the sparse walk is also timed as the best of 3 further calls (the dense one is too slow)."""
    torch.set_num_threads(os.cpu_count() or 1)
    cam, boundary = make_inputs()
    dense = variant == "dense"
    with PeakMemory() as memory:
        start = time.perf_counter()
        scores, label = propagate_irn(cam, boundary, IMAGE_SIZE, dense_reference=dense)
        first_seconds = time.perf_counter() - start
    seconds = first_seconds
    for _ in range(0 if dense else 3):
        start = time.perf_counter()
        propagate_irn(cam, boundary, IMAGE_SIZE)
        seconds = min(seconds, time.perf_counter() - start)
    np.save(out_dir / f"{variant}_scores.npy", scores)
    np.save(out_dir / f"{variant}_label.npy", label)
    return {"seconds": seconds, "first_seconds": first_seconds, "peak_bytes": memory.peak,
            "memory_method": memory.method}


def bench_random_walk() -> dict:
    """Run both variants in fresh subprocesses and compare them."""
    with tempfile.TemporaryDirectory() as tmp:
        measured = {}
        for variant in ("sparse", "dense"):
            done = subprocess.run([sys.executable, "-m", "bench.random_walk", "--variant", variant, "--out", tmp],
                                  cwd=REPO, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{variant} random walk failed:\n{done.stderr[-3000:]}")
            measured[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        tmp = Path(tmp)
        labels = {v: np.load(tmp / f"{v}_label.npy") for v in measured}
        scores = {v: np.load(tmp / f"{v}_scores.npy") for v in measured}
    sparse, dense = measured["sparse"], measured["dense"]
    h, w = math.ceil(IMAGE_SIZE[0] / 4), math.ceil(IMAGE_SIZE[1] / 4)
    return {"size": f"{IMAGE_SIZE[1]}x{IMAGE_SIZE[0]}", "nodes": h * w, "classes": NUM_CLASSES,
            "threads": os.cpu_count(), "dense_s": dense["seconds"], "sparse_s": sparse["seconds"],
            "sparse_first_call_s": sparse["first_seconds"],
            "speedup_sparse_vs_dense": dense["seconds"] / sparse["seconds"],
            "dense_peak_mib": dense["peak_bytes"] / 2**20, "sparse_peak_mib": sparse["peak_bytes"] / 2**20,
            "memory_pct_sparse_of_dense": 100 * sparse["peak_bytes"] / dense["peak_bytes"],
            "label_agreement_pct": 100 * float((labels["sparse"] == labels["dense"]).mean()),
            "max_abs_score_diff": float(np.abs(scores["sparse"] - scores["dense"]).max()),
            "memory_method": dense["memory_method"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=("sparse", "dense"), help="internal: measure one variant")
    parser.add_argument("--out", type=Path, help="internal: folder for the variant's scores and labels")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.out)))
        return
    for key, value in bench_random_walk().items():
        print(f"  {key:<30} {value:.4g}" if isinstance(value, float) else f"  {key:<30} {value}")


if __name__ == "__main__":
    main()

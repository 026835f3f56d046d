"""Sparse random walk against the dense squaring reference (IRN's ``make_sem_seg_labels``), on the CPU.

Two images: one of the demo profile's size (112x144, stride-4 grid 28x36 = 1,008 nodes, t = 16 as luigi.cfg
sets for the demo) and one of VOC's typical 500x375 (94x125 = 11,750 nodes, IRN's t = 256). Each has a
boundary map with object-like contours plus noise and a random smooth K=3 CAM; IRN's other defaults (beta 10,
radius 5, bg 0.25). Each (image, variant) runs the whole ``propagate_irn`` in a fresh process, which reports
wall time and the peak resident memory of its first call above the state just before it
(bench/measure.py's ``PeakMemory``). Figures are ratios within the run: speed-up, memory %, label agreement %.

At 500x375 the dense reference does 8 squarings of an 11,750^2 matrix (~26 TFLOP): about 2.5 minutes on 2 idle
cores at ~190 GFLOP/s, longer on a shared machine. The sparse walk takes about a second.

Run alone with ``python -m bench.random_walk``; ``make bench`` includes it (bench/propagation.py). ``make gpu-check``
(bench/gpu_parts.py) measures the same walk on CUDA through ``run_variant``'s ``device``; there the peak is the
CUDA allocator's (``torch.cuda.max_memory_allocated``), not the resident memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.maps import smooth_cam_stack  # noqa: E402
from bench.measure import PeakMemory, in_fresh_process  # noqa: E402
from stages.propagation.random_walk import propagate_irn  # noqa: E402

# name -> (height, width, walk steps)
IMAGES = {"demo": (112, 144, 16), "voc": (375, 500, 256)}
NUM_CLASSES = 3


def make_inputs(name: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(stride-4 CAM (K, h, w) in [0, 1], boundary map (h, w) in [0, 1]) for image ``name``."""
    rng = np.random.default_rng(seed)
    height, width, _ = IMAGES[name]
    h, w = math.ceil(height / 4), math.ceil(width / 4)
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


def run_variant(name: str, variant: str, out_dir: Path, device: str = "cpu") -> dict:
    """Inside a fresh process: peak memory of the first propagate_irn call (first-call costs included), and
    its time; the sparse walk (and on CUDA the dense one too) is also timed as the best of 3 further calls (the
    dense one is too slow on the CPU). Scores and labels go to ``out_dir`` as ``<name>_<variant>_<device>_*``."""
    torch.set_num_threads(os.cpu_count() or 1)
    cam, boundary = make_inputs(name)
    height, width, steps = IMAGES[name]
    dense, dev = variant == "dense", torch.device(device)
    on_cuda = dev.type == "cuda"
    if on_cuda:
        torch.cuda.init()                 # context creation is not the walk's memory
        torch.cuda.reset_peak_memory_stats(dev)
    with PeakMemory() as memory:
        start = time.perf_counter()
        scores, label = propagate_irn(cam, boundary, (height, width), steps=steps, device=dev, dense_reference=dense)
        first_seconds = time.perf_counter() - start   # the result is on the host: the device is synchronised
    peak = torch.cuda.max_memory_allocated(dev) if on_cuda else memory.peak
    seconds = first_seconds
    for _ in range(0 if dense and not on_cuda else 3):
        start = time.perf_counter()
        propagate_irn(cam, boundary, (height, width), steps=steps, device=dev, dense_reference=dense)
        seconds = min(seconds, time.perf_counter() - start)
    np.save(out_dir / f"{name}_{variant}_{dev.type}_scores.npy", scores)
    np.save(out_dir / f"{name}_{variant}_{dev.type}_label.npy", label)
    return {"seconds": seconds, "first_seconds": first_seconds, "peak_bytes": peak,
            "memory_method": "cuda max_memory_allocated" if on_cuda else memory.method}


def bench_random_walk(images: tuple[str, ...] = ("demo", "voc")) -> dict:
    """Both variants on each image, in fresh processes; returns the figures per image."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in images:
            measured = {v: in_fresh_process("bench.random_walk", "--variant", f"{name}:{v}", "--out", tmp)
                        for v in ("sparse", "dense")}
            labels = {v: np.load(Path(tmp) / f"{name}_{v}_cpu_label.npy") for v in measured}
            scores = {v: np.load(Path(tmp) / f"{name}_{v}_cpu_scores.npy") for v in measured}
            sparse, dense = measured["sparse"], measured["dense"]
            height, width, steps = IMAGES[name]
            results[name] = {
                "size": f"{width}x{height}", "nodes": math.ceil(height / 4) * math.ceil(width / 4),
                "walk_steps": steps, "classes": NUM_CLASSES, "threads": os.cpu_count(),
                "dense_s": dense["seconds"], "sparse_s": sparse["seconds"],
                "sparse_first_call_s": sparse["first_seconds"],
                "speedup_sparse_vs_dense": dense["seconds"] / sparse["seconds"],
                "dense_peak_mib": dense["peak_bytes"] / 2**20, "sparse_peak_mib": sparse["peak_bytes"] / 2**20,
                "memory_pct_sparse_of_dense": 100 * sparse["peak_bytes"] / dense["peak_bytes"],
                "label_agreement_pct": 100 * float((labels["sparse"] == labels["dense"]).mean()),
                "max_abs_score_diff": float(np.abs(scores["sparse"] - scores["dense"]).max()),
                "memory_method": dense["memory_method"]}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", help="internal: IMAGE:VARIANT[:DEVICE] (sparse | dense; cpu | cuda) to "
                        "measure in this process")
    parser.add_argument("--out", type=Path, help="internal: folder for the variant's scores and labels")
    parser.add_argument("--images", default="demo,voc", help="comma-separated: demo, voc")
    args = parser.parse_args()
    if args.variant:
        name, variant, *device = args.variant.split(":")
        print(json.dumps(run_variant(name, variant, args.out, *device)))
        return
    for name, figures in bench_random_walk(tuple(args.images.split(","))).items():
        print(name)
        for key, value in figures.items():
            print(f"  {key:<30} {value:.4g}" if isinstance(value, float) else f"  {key:<30} {value}")


if __name__ == "__main__":
    main()

"""WSGCN-I propagation (stages/propagation/gcn.py): the dense T^t adjacency against the scalable top-k one.

Two images: one of the demo profile's size (112x144, stride-4 grid 28x36 = 1,008 nodes, t = 16 as luigi.cfg
sets for the demo) and one of VOC's typical 500x375 (94x125 = 11,750 nodes, the reference's t = 256). Each is
a synthetic render (data/synthetic.py) with

- a boundary map from its ground-truth object contours (Gaussian-blurred, plus uniform noise), so the walk
  has regions to stay in, as a trained IRNet's would;
- CAMs: its blurred ground-truth masks with noise, max-normalised (stride 4 and full resolution);
- node features from a randomly initialised IRNet (``resnet_mini``) on the image, through the same
  ``infer_boundary_features`` the Propagate stage uses.

Each (image, mode) runs the whole ``propagate_gcn`` (partial labels, adjacency, 250-epoch GCN) in a fresh
subprocess that reports its wall time, split into graph building and training, and its peak resident memory
above the state before the call (bench/measure.py's ``PeakMemory``). Figures: seconds and peak MiB per
image for dense and topk, and the percentage of pixels whose label agrees between them.

On 2 CPU cores the 500x375 image takes minutes in either mode: T^256 costs ~26 TFLOP by squaring (dense) or
~5 TFLOP of sparse products (topk, for any k). Run alone with ``python -m bench.gcn``.
"""

from __future__ import annotations

import argparse
import dataclasses
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

from bench.maps import render_with_cams  # noqa: E402
from bench.measure import PeakMemory, in_fresh_process, timed_phase  # noqa: E402
from stages.config import PropagateConfig  # noqa: E402

# name -> (height, width, walk steps)
IMAGES = {"demo": (112, 144, 16), "voc": (375, 500, 256)}
TOPK = 512
SEED = 3


def make_inputs(name: str) -> dict:
    """The image, its CAMs (stride 4 and full), boundary map and IRNet features, all deterministic."""
    import cv2

    from models.affinity import IRNet
    from models.resnet import create_backbone
    from stages.affinity.train import infer_boundary_features

    height, width, _ = IMAGES[name]
    rng = np.random.default_rng(SEED)
    sample, classes, high = render_with_cams(SEED, 0, height, width, rng)
    semantic = sample.semantic.astype(np.int32)
    grid = (math.ceil(height / 4), math.ceil(width / 4))
    cam = np.stack([cv2.resize(c, (grid[1], grid[0]), interpolation=cv2.INTER_AREA) for c in high])
    cam /= cam.max(axis=(1, 2), keepdims=True)
    small = cv2.resize(semantic, (grid[1], grid[0]), interpolation=cv2.INTER_NEAREST)
    edges = np.zeros(grid, np.float32)
    edges[:, 1:] += small[:, 1:] != small[:, :-1]
    edges[1:, :] += small[1:, :] != small[:-1, :]
    boundary = np.clip(cv2.GaussianBlur(np.minimum(edges, 1), (0, 0), 0.7) * 2 + rng.uniform(0, 0.15, grid), 0, 1)
    torch.manual_seed(SEED)
    model = IRNet(create_backbone("resnet_mini", strides=(1, 2, 1, 1))).eval()
    features = infer_boundary_features(model, sample.image, torch.device("cpu"))["boundary_features"]
    return {"rgb": sample.image, "cam": cam, "high_res": high, "boundary": boundary.astype(np.float32),
            "features": features, "classes": len(classes)}


def run_variant(name: str, mode: str, out_dir: Path) -> dict:
    """Inside a fresh process: one propagate_gcn call, timed by phase, with its peak memory."""
    from stages.propagation import gcn

    torch.set_num_threads(os.cpu_count() or 1)
    inputs = make_inputs(name)
    height, width, steps = IMAGES[name]
    cfg = dataclasses.replace(PropagateConfig(propagation="gcn"), gcn_adjacency=mode, gcn_topk=TOPK,
                              gcn_walk_steps=steps, gcn_dense_max_mib=1e6)
    phases: dict[str, float] = {}
    gcn.build_graph = timed_phase(phases, "graph_s", gcn.build_graph)
    gcn.train_gcns = timed_phase(phases, "train_s", gcn.train_gcns)
    with PeakMemory() as memory:
        start = time.perf_counter()
        _, label = gcn.propagate_gcn(cfg, inputs["cam"], inputs["high_res"], inputs["boundary"],
                                     inputs["features"], inputs["rgb"], name, (height, width), "cpu",
                                     entropy_classes=21)
        seconds = time.perf_counter() - start
    np.save(out_dir / f"{name}_{mode}_label.npy", label)
    return {"seconds": seconds, **phases, "peak_bytes": memory.peak, "memory_method": memory.method}


def bench_gcn(images: tuple[str, ...] = ("demo", "voc")) -> dict:
    """Both modes on each image, in fresh subprocesses; returns the figures per image."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in images:
            measured = {}
            for mode in ("dense", "topk"):
                measured[mode] = in_fresh_process("bench.gcn", "--variant", f"{name}:{mode}", "--out", tmp)
            labels = {m: np.load(Path(tmp) / f"{name}_{m}_label.npy") for m in measured}
            height, width, steps = IMAGES[name]
            dense, topk = measured["dense"], measured["topk"]
            results[name] = {
                "size": f"{width}x{height}", "nodes": math.ceil(height / 4) * math.ceil(width / 4),
                "walk_steps": steps, "topk": TOPK, "threads": os.cpu_count(),
                "dense_s": dense["seconds"], "dense_graph_s": dense["graph_s"], "dense_train_s": dense["train_s"],
                "topk_s": topk["seconds"], "topk_graph_s": topk["graph_s"], "topk_train_s": topk["train_s"],
                "dense_peak_mib": dense["peak_bytes"] / 2**20, "topk_peak_mib": topk["peak_bytes"] / 2**20,
                "label_agreement_pct": 100 * float((labels["dense"] == labels["topk"]).mean()),
                "memory_method": dense["memory_method"]}
    return results


def bench_dense_products(nodes: int = 4032, columns: tuple[int, ...] = (2, 4), repeats: int = 20) -> dict:
    """One training epoch's Â product, forward and backward, on one thread: the GCN's ``_DenseProduct`` against
    plain autograd on ``Â @ x``, for a row-normalised dense Â of ``nodes`` nodes (4,032: the `double` profile's
    72x56 stride-4 grid) and x of a few columns (background and the image's classes)."""
    from stages.propagation.gcn import _DenseProduct

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(SEED)
    matrix = torch.rand(nodes, nodes, generator=generator)
    matrix /= matrix.sum(1, keepdim=True)

    def epoch_ms(product, x: torch.Tensor, weights: torch.Tensor) -> float:
        torch.autograd.grad((product(x) * weights).sum(), x)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.autograd.grad((product(x) * weights).sum(), x)
        return 1e3 * (time.perf_counter() - start) / repeats

    results = {}
    try:
        for width in columns:
            x = torch.randn(nodes, width, generator=generator, requires_grad=True)
            weights = torch.randn(nodes, width, generator=generator)
            ours = epoch_ms(lambda v: _DenseProduct.apply(matrix, v), x, weights)
            plain = epoch_ms(lambda v: matrix @ v, x, weights)
            results[f"columns_{width}"] = {"ours_ms": ours, "plain_ms": plain, "speedup": plain / ours}
    finally:
        torch.set_num_threads(threads)
    return results


def dense_product_lines(results: dict) -> list[str]:
    """:func:`bench_dense_products`' figures as printed lines (``python -m bench.gcn`` and ``make bench``)."""
    return [f"  gcn dense product, {width}: {f['ours_ms']:.1f} ms vs autograd's {f['plain_ms']:.1f} ms "
            f"({f['speedup']:.1f}x)" for width, f in results.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", help="internal: IMAGE:MODE to measure in this process")
    parser.add_argument("--out", type=Path, help="internal: folder for the variant's labels")
    parser.add_argument("--images", default="demo,voc", help="comma-separated: demo, voc")
    args = parser.parse_args()
    if args.variant:
        name, mode = args.variant.split(":")
        print(json.dumps(run_variant(name, mode, args.out)))
        return
    print("dense product, forward + backward per epoch, one thread (4,032 nodes)")
    print("\n".join(dense_product_lines(bench_dense_products())))
    for name, figures in bench_gcn(tuple(args.images.split(","))).items():
        print(name)
        for key, value in figures.items():
            print(f"  {key:<22} {value:.4g}" if isinstance(value, float) else f"  {key:<22} {value}")


if __name__ == "__main__":
    main()

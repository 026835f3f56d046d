"""A2GNN propagation (stages/propagation/a2gnn.py): our window attention against the reference's dense N x N matrices.

Two images: one of the demo profile's size (112x144, stride-8 grid 14x18 = 252 nodes) and one of VOC's typical
500x375 (47x63 = 2,961 nodes). Each is a synthetic render (data/synthetic.py) with

- window affinities (radius 3) and node features (the three taps, 224 channels for ``resnet_mini``) from a
  randomly initialised a2gnn affinity net, through the same ``infer_window_graph`` the Propagate stage uses;
- seeds: its ground truth with 80% of the pixels set to ignore; CAMs: its blurred masks with noise.

Each (image, mode) runs, on one thread, ``propagate_a2gnn`` (image supervision: GNN training, random walk;
the final CRF is off, it is the same in both modes) in a fresh subprocess that reports its wall time and its
peak resident memory above the state before the call (bench/measure.py's ``PeakMemory``). ``dense`` swaps
in the reference's formulation: each attention layer on N x N cosine / mask / logit / softmax matrices and
H' = P H as a dense product, and the random walk as T^64 by six dense squarings. Figures: seconds per image,
milliseconds per training epoch, peak MiB, and the largest difference between the two modes' scores (float
rounding, compounded over the epochs).

The VOC-size image runs 5 + 5 epochs instead of the reference's 50 + 50 (the dense mode needs minutes per
epoch-hundred on 2 CPU cores); per-epoch times are reported so the full schedule can be extrapolated.
Run alone with ``python -m bench.a2gnn``; ``make bench`` runs the demo image only.

``python -m bench.a2gnn --batch`` measures training many images' GNNs at once (``propagate_a2gnn_many``,
``Propagate.a2gnn_batch_images``): 16 demo-size renders (same affinity net, seeds and CAMs as above), the reference
schedule for image supervision (50 + 50 epochs, random walk on, final CRF off), one thread, each mode in a fresh
process after a short warm-up call: ``propagate_a2gnn`` image by image (batch 1) against all 16 in one call
(batch 16). Figures: seconds per image, the speed-up, and the largest score difference between the two.
"""

from __future__ import annotations

import argparse
import json
import math
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

# name -> (height, width, epochs per phase; 0 = the reference's 50)
IMAGES = {"demo": (112, 144, 0), "voc": (375, 500, 5)}
SEED = 5
WINDOW_RADIUS = 3


def make_inputs(name: str, index: int = 0, model: torch.nn.Module | None = None) -> dict:
    """Image ``index``'s render, seeds, CAMs and the a2gnn net's window graph, all deterministic; ``model`` (the
    randomly initialised affinity net every image shares) is built when not given."""
    from stages.affinity.a2gnn import infer_window_graph

    height, width, _ = IMAGES[name]
    rng = np.random.default_rng(SEED if index == 0 else [SEED, index])
    sample, keys, high = render_with_cams(SEED, index, height, width, rng)
    seeds = sample.semantic.astype(np.uint8).copy()
    seeds[rng.random(seeds.shape) < 0.8] = 255
    graph = infer_window_graph(model if model is not None else affinity_net(), sample.image, torch.device("cpu"))
    return {"rgb": sample.image, "high_res": high, "keys": keys, "seeds": seeds, **graph}


def affinity_net() -> torch.nn.Module:
    """The randomly initialised a2gnn affinity net (resnet_mini) the inputs come from."""
    from models.a2gnn import A2GNNAffinityNet
    from models.resnet import create_backbone

    torch.manual_seed(SEED)
    return A2GNNAffinityNet(create_backbone("resnet_mini"), window_radius=WINDOW_RADIUS).eval()


def _dense_matrices(graph) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's A (window affinities, diagonal 1) and window mask M, both N x N."""
    n = graph.num_nodes
    rows = torch.arange(n)[:, None].expand_as(graph.index)[graph.valid]
    cols = graph.index[graph.valid]
    adjacency = torch.zeros(n, n)
    adjacency[rows, cols] = graph.affinity[graph.valid]
    mask = torch.zeros(n, n)
    mask[rows, cols] = 1
    return adjacency, mask


def dense_attention(h: torch.Tensor, beta: float, adjacency: torch.Tensor, mask: torch.Tensor,
                    affinity_weight: float = 10.0) -> torch.Tensor:
    """The reference's attention layer (pygcn/A2GNN.py) on N x N matrices: softmax over j of beta cos(h_i, h_j)
    + affinity_weight A_ij, with -1e9 outside i's window (``mask`` 0) and where the cosine is negative; times H."""
    norms = h.norm(dim=1, keepdim=True)
    cos = (h @ h.T) / (norms @ norms.T + 1e-7)
    penalty = torch.zeros_like(cos)
    penalty[mask == 0] = -1e9
    penalty[cos < 0] = -1e9
    return torch.softmax(beta * cos + penalty + affinity_weight * adjacency, dim=1) @ h


def use_dense_reference() -> None:
    """Swap the window attention and walk for the reference's dense N x N versions (this process only)."""
    import models.a2gnn
    import stages.propagation.a2gnn

    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def matrices(graph):
        if id(graph) not in cache:
            cache.clear()
            cache[id(graph)] = _dense_matrices(graph)
        return cache[id(graph)]

    def graph_attention(h, beta, graph, affinity_weight=10.0):
        return dense_attention(h, beta, *matrices(graph), affinity_weight)

    def dense_walk(vectors, graph, beta, steps):
        adjacency, _ = matrices(graph)
        powered = adjacency ** beta
        transition = powered / powered.sum(0, keepdim=True)
        for _ in range(int(math.log2(steps))):
            transition = transition @ transition
        return vectors @ transition

    models.a2gnn.window_attention = graph_attention
    stages.propagation.a2gnn.window_random_walk = dense_walk


def run_variant(name: str, mode: str, out_dir: Path) -> dict:
    """Inside a fresh process: one propagate_a2gnn call, timed, with its peak memory."""
    from stages.propagation import a2gnn

    # One thread: on a shared, oversubscribed CPU, OpenMP spin-waits turn the window mode's many small kernels
    # into seconds per epoch (measured 3.4 s against 15 ms with 2 threads on a loaded 2-core box).
    torch.set_num_threads(1)
    inputs = make_inputs(name)
    height, width, epochs = IMAGES[name]
    cfg = PropagateConfig(propagation="a2gnn", a2gnn_crf_preset="", a2gnn_seed_epochs=epochs,
                          a2gnn_gcrf_epochs=epochs)
    schedule = a2gnn.resolve_schedule(cfg, "image")
    total_epochs = schedule.seed_epochs + schedule.gcrf_epochs
    if mode == "dense":
        use_dense_reference()
    phases: dict[str, float] = {}
    a2gnn.train_a2gnn = timed_phase(phases, "train_s", a2gnn.train_a2gnn)
    with PeakMemory() as memory:
        start = time.perf_counter()
        probs, _ = a2gnn.propagate_a2gnn(cfg, inputs["high_res"], inputs["window_affinity"], inputs["node_features"],
                                         inputs["rgb"], inputs["seeds"], inputs["keys"], name, (height, width),
                                         "cpu", stride=int(inputs["affinity_stride"]))
        seconds = time.perf_counter() - start
    np.save(out_dir / f"{name}_{mode}_probs.npy", probs)
    nodes = math.prod(inputs["window_affinity"].shape[1:])
    return {"seconds": seconds, **phases, "epochs": total_epochs, "nodes": nodes,
            "features": int(inputs["node_features"].shape[0]), "peak_bytes": memory.peak,
            "memory_method": memory.method}


def bench_a2gnn(images: tuple[str, ...] = ("demo", "voc")) -> dict:
    """Both modes on each image, in fresh subprocesses; returns the figures per image."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in images:
            measured = {}
            for mode in ("window", "dense"):
                measured[mode] = in_fresh_process("bench.a2gnn", "--variant", f"{name}:{mode}", "--out", tmp)
            probs = {m: np.load(Path(tmp) / f"{name}_{m}_probs.npy") for m in measured}
            height, width, _ = IMAGES[name]
            window, dense = measured["window"], measured["dense"]
            results[name] = {
                "size": f"{width}x{height}", "nodes": window["nodes"], "node_features": window["features"],
                "window_radius": WINDOW_RADIUS, "epochs": window["epochs"], "threads": 1,
                "window_s": window["seconds"], "dense_s": dense["seconds"],
                "window_ms_per_epoch": 1000 * window["train_s"] / window["epochs"],
                "dense_ms_per_epoch": 1000 * dense["train_s"] / dense["epochs"],
                "speedup_window_vs_dense": dense["seconds"] / window["seconds"],
                "window_peak_mib": window["peak_bytes"] / 2**20, "dense_peak_mib": dense["peak_bytes"] / 2**20,
                "max_abs_score_diff": float(np.abs(probs["window"] - probs["dense"]).max()),
                "label_agreement_pct": 100 * float((probs["window"].argmax(0) == probs["dense"].argmax(0)).mean()),
                "memory_method": window["memory_method"]}
    return results


BATCH_IMAGES = 16


def run_batch_variant(batch_images: int, count: int, out_dir: Path) -> dict:
    """Inside a fresh process: ``count`` demo images, per image (``batch_images`` = 1) or in batches, timed."""
    from stages.propagation import a2gnn

    torch.set_num_threads(1)   # as run_variant: one thread is the fast setting on a shared CPU
    height, width, _ = IMAGES["demo"]
    model = affinity_net()
    inputs = [make_inputs("demo", index, model) for index in range(count)]
    items = [{"high_res": x["high_res"], "window_affinity": x["window_affinity"],
              "node_features": x["node_features"], "rgb": x["rgb"], "seeds": x["seeds"], "keys": x["keys"],
              "image_id": f"demo{index}", "size": (height, width), "stride": int(x["affinity_stride"])}
             for index, x in enumerate(inputs)]
    cfg = PropagateConfig(propagation="a2gnn", a2gnn_crf_preset="", a2gnn_batch_images=batch_images)
    # Warm-up (lazy kernel and allocator set-up, ~1 s on the first call) on a short schedule, not timed.
    a2gnn.propagate_a2gnn_many(PropagateConfig(propagation="a2gnn", a2gnn_crf_preset="", a2gnn_seed_epochs=2,
                                               a2gnn_gcrf_epochs=2), items[:batch_images], "cpu")
    start = time.perf_counter()
    if batch_images == 1:
        results = [a2gnn.propagate_a2gnn(cfg, **item, device="cpu") for item in items]
    else:
        results = []
        for first in range(0, count, batch_images):
            results += a2gnn.propagate_a2gnn_many(cfg, items[first:first + batch_images], "cpu")
    seconds = time.perf_counter() - start
    np.savez(out_dir / f"batch{batch_images}_probs.npz", *[probs for probs, _ in results])
    schedule = a2gnn.resolve_schedule(cfg, "image")
    return {"seconds": seconds, "epochs": schedule.seed_epochs + schedule.gcrf_epochs,
            "nodes": math.prod(inputs[0]["window_affinity"].shape[1:]),
            "classes": [len(x["keys"]) for x in inputs]}


def bench_a2gnn_batch(count: int = BATCH_IMAGES, batch_sizes: tuple[int, ...] = (1, BATCH_IMAGES)) -> dict:
    """Per-image seconds of ``count`` demo images for each batch size (the first is the baseline), in fresh
    subprocesses; plus the largest score difference and the argmax agreement against the baseline."""
    measured = {}
    with tempfile.TemporaryDirectory() as tmp:
        for batch_images in batch_sizes:
            measured[batch_images] = in_fresh_process("bench.a2gnn", "--batch-variant", str(batch_images),
                                                      "--count", str(count), "--out", tmp)
        probs = {}
        for b in batch_sizes:
            with np.load(Path(tmp) / f"batch{b}_probs.npz") as stored:
                probs[b] = [stored[f"arr_{i}"] for i in range(count)]
    base = batch_sizes[0]
    height, width, _ = IMAGES["demo"]
    results = {"size": f"{width}x{height}", "nodes": measured[base]["nodes"], "images": count,
               "epochs": measured[base]["epochs"], "threads": 1,
               "classes_per_image": ",".join(str(c) for c in measured[base]["classes"])}
    for batch_images in batch_sizes:
        results[f"batch{batch_images}_s_per_image"] = measured[batch_images]["seconds"] / count
    for b in batch_sizes[1:]:
        pairs = list(zip(probs[b], probs[base]))
        results[f"speedup_batch{b}_vs_{base}"] = measured[base]["seconds"] / measured[b]["seconds"]
        results[f"batch{b}_max_abs_score_diff"] = max(float(np.abs(got - want).max()) for got, want in pairs)
        results[f"batch{b}_same_argmax_images"] = sum(bool((got.argmax(0) == want.argmax(0)).all())
                                                      for got, want in pairs)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", help="internal: IMAGE:MODE to measure in this process")
    parser.add_argument("--batch-variant", type=int, help="internal: batch size to measure in this process")
    parser.add_argument("--count", type=int, default=BATCH_IMAGES, help="images for --batch (default 16)")
    parser.add_argument("--batch-sizes", default=f"1,{BATCH_IMAGES}",
                        help="comma-separated batch sizes for --batch; the first is the baseline (default 1,16)")
    parser.add_argument("--out", type=Path, help="internal: folder for the variant's scores")
    parser.add_argument("--images", default="demo,voc", help="comma-separated: demo, voc")
    parser.add_argument("--batch", action="store_true",
                        help="measure many images' GNNs trained at once (batch 1 vs 16) instead")
    args = parser.parse_args()
    if args.variant:
        name, mode = args.variant.split(":")
        print(json.dumps(run_variant(name, mode, args.out)))
        return
    if args.batch_variant:
        print(json.dumps(run_batch_variant(args.batch_variant, args.count, args.out)))
        return
    if args.batch:
        sizes = tuple(int(b) for b in args.batch_sizes.split(","))
        for key, value in bench_a2gnn_batch(args.count, sizes).items():
            print(f"  {key:<34} {value:.4g}" if isinstance(value, float) else f"  {key:<34} {value}")
        return
    for name, figures in bench_a2gnn(tuple(args.images.split(","))).items():
        print(name)
        for key, value in figures.items():
            print(f"  {key:<26} {value:.4g}" if isinstance(value, float) else f"  {key:<26} {value}")


if __name__ == "__main__":
    main()

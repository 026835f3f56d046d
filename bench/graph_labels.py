"""DSRG growing and DGCN graph-cut label updates (stages/seed_net/growing.py, stages/seed_net/graphcut.py) against
straightforward baselines written like the reference code, on the CPU.

Baselines:
- DSRG: per-pixel Python loop building the label map, then a Python BFS per class from its seeds
  (speedinghzl/DSRG ``UpdateSeedLayer3`` walks pixels with ``np.ndenumerate`` and labels components in Python).
- DGCN: dense N x N squared distances (``scipy.spatial.distance.cdist``), kNN matrix, and per class one
  ``add_tedge`` per node and one ``add_edge`` per kNN pair found with ``np.where`` on the node's dense row
  (hustvl/DGCN ``generate_supervision``).

Grids: 14x14 (112 crop, stride 8; the demo profile), 41x41 (321 crop, DGCN/DSRG), 47x63 (a whole 500x375 image at
stride 8), 375x500 (a whole VOC image at full resolution).
21 channels, 3 present classes (background + 2), seeds on eroded object cores. Node features: 1,280-d (DGCN's
layer1 + layer3 width) on the small grids, 3-d on 375x500.

Each (stage, variant, grid) runs single-threaded in a fresh subprocess that reports the peak resident memory of
its first call above the state before it (bench.measure.PeakMemory) and the best per-image time of a few calls.

At 375x500 (N = 187,500 nodes) the kNN is O(N²) for both variants (~35e9 distances). It is timed on a sample of
rows and extrapolated (linear in rows), saying so; the baseline's N x N matrices (float64 distances + bool kNN,
316 GB) are reported analytically. The cut stage there runs for real on exact kNN edges from a k-d tree (the same
edge list for both variants); the baseline's per-node dense-row ``np.where`` scan is timed on sample rows and
extrapolated. Figures are per image.

Run alone with ``python -m bench.graph_labels``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import maxflow
import numpy as np
import torch
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.maps import smooth_cam_stack  # noqa: E402
from bench.measure import PeakMemory, in_fresh_process  # noqa: E402
from data.labelspace import IGNORE_INDEX  # noqa: E402
from stages.seed_net.graphcut import DGCNConfig, class_cut, graphcut_labels, knn_edges, knn_rows  # noqa: E402
from stages.seed_net.growing import DSRGConfig, grow_seeds  # noqa: E402

NUM_CLASSES = 21
PRESENT_FG = (5, 12)
# name: (h, w, images per batch, feature dim)
# 47x63: a whole 500x375 image at the seed net's stride 8, where DGCN builds its graph for one image.
GRIDS = {"14x14": (14, 14, 8, 1280), "41x41": (41, 41, 4, 1280), "47x63": (47, 63, 1, 1280),
         "375x500": (375, 500, 1, 3)}
BIG = "375x500"
KNN_SAMPLE_ROWS = 178      # rows of the 375x500 distance matrix actually computed (2 of our blocks)
SCAN_SAMPLE_ROWS = 2000    # dense-row np.where scans timed for the 375x500 baseline
THREADS = 1


# ----------------------------------------------------------------------------------------------------------------
# Baselines (reference-style loops)


def grow_seeds_baseline(refined: np.ndarray, seeds: np.ndarray, present: np.ndarray,
                        cfg: DSRGConfig | None = None) -> np.ndarray:
    """DSRG growing with per-pixel Python loops and a BFS per class; (B, C, h, w), (B, h, w), (B, C) -> (B, h, w)."""
    cfg = cfg or DSRGConfig()
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    if cfg.connectivity == 4:
        offsets = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    out = np.array(seeds, dtype=np.int64, copy=True)
    for b in range(refined.shape[0]):
        classes = [c for c in range(refined.shape[1]) if c == 0 or present[b, c]]
        _, h, w = refined[b].shape
        region = np.full((h, w), -1, np.int64)
        for (y, x), s in np.ndenumerate(seeds[b]):
            if s != IGNORE_INDEX:
                region[y, x] = s
        for y in range(h):
            for x in range(w):
                values = [refined[b, c, y, x] for c in classes]
                best = int(np.argmax(values))
                q, c = values[best], classes[best]
                if q > cfg.fg_threshold and (c != 0 or q > cfg.bg_threshold):
                    region[y, x] = c
        for c in classes:
            queue = deque((y, x) for (y, x), s in np.ndenumerate(seeds[b]) if s == c and region[y, x] == c)
            seen = set(queue)
            while queue:
                y, x = queue.popleft()
                if seeds[b, y, x] == IGNORE_INDEX:
                    out[b, y, x] = c
                for dy, dx in offsets:
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and (ny, nx) not in seen and region[ny, nx] == c:
                        seen.add((ny, nx))
                        queue.append((ny, nx))
    return out


def knn_matrix_baseline(features: np.ndarray, k: int) -> np.ndarray:
    """Dense kNN matrix (N, N) bool from features (D, h, w): d <= k-th smallest of the row, minus self."""
    nodes = features.reshape(features.shape[0], -1).T
    dist = cdist(nodes, nodes, "sqeuclidean")
    kth = np.partition(dist, min(k, len(nodes)) - 1, axis=1)[:, min(k, len(nodes)) - 1]
    knn = dist <= kth[:, None]
    np.fill_diagonal(knn, False)
    return knn


def class_cut_baseline(prob_c: np.ndarray, markers: np.ndarray, c: int, neighbours, cfg: DGCNConfig | None = None
                       ) -> tuple[np.ndarray, float]:
    """One cut built node by node and edge by edge; ``neighbours(i)`` gives node i's kNN row indices."""
    cfg = cfg or DGCNConfig()
    n = prob_c.shape[0]
    p = np.clip(prob_c.astype(np.float64), cfg.unary_eps, 1.0 - cfg.unary_eps)
    graph = maxflow.Graph[float]()
    nodes = graph.add_nodes(n)
    for i in range(n):
        if markers[i] == c:
            graph.add_tedge(nodes[i], 0, cfg.seed_capacity)
        elif markers[i] == IGNORE_INDEX:
            graph.add_tedge(nodes[i], -math.log10(p[i]), -math.log10(1.0 - p[i]))
        else:
            graph.add_tedge(nodes[i], cfg.seed_capacity, 0)
        for j in neighbours(i):
            graph.add_edge(nodes[i], nodes[j], cfg.edge_capacity, cfg.edge_capacity)
    flow = graph.maxflow()
    return graph.get_grid_segments(np.arange(n)), float(flow)


def graphcut_labels_baseline(probs: np.ndarray, seeds: np.ndarray, present: np.ndarray, neighbours,
                             cfg: DGCNConfig | None = None) -> tuple[np.ndarray, dict]:
    """Reference-style update for one image: a cut for every present class, then the same merge as ours.
    Returns (labels (h, w), {class: (segment, flow)})."""
    cfg = cfg or DGCNConfig()
    c_total, h, w = probs.shape
    p = probs.reshape(c_total, -1)
    markers = seeds.reshape(-1).astype(np.int64)
    labels = markers.copy()
    best_p = np.full(h * w, -np.inf)
    cuts = {}
    for c in [0] + [c for c in range(1, c_total) if present[c]]:
        segment, flow = class_cut_baseline(p[c], markers, c, neighbours, cfg)
        cuts[c] = (segment, flow)
        for i in range(h * w):
            if markers[i] == IGNORE_INDEX and p[c, i] > cfg.update_threshold and segment[i] and p[c, i] > best_p[i]:
                labels[i], best_p[i] = c, p[c, i]
    return labels.reshape(h, w), cuts


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def make_case(h: int, w: int, batch: int, dim: int, seed: int = 0) -> dict:
    """Synthetic batch: probs (B, C, h, w) float32, refined (CRF-like, sharper), seeds, present, features."""
    rng = np.random.default_rng(seed)
    probs, refined, seeds, features = [], [], [], []
    present = np.zeros((batch, NUM_CLASSES), bool)
    present[:, 0] = True
    present[:, list(PRESENT_FG)] = True
    mix = rng.normal(size=(len(PRESENT_FG) + 1, dim))
    for _ in range(batch):
        cams = smooth_cam_stack(rng, len(PRESENT_FG), h, w)
        gt_index = np.concatenate([np.full((1, h, w), 0.35, np.float32), cams]).argmax(0)
        gt = np.array((0, *PRESENT_FG))[gt_index]
        noise = np.stack([ndimage.gaussian_filter(rng.normal(size=(h, w)), max(1.0, min(h, w) / 12))
                          for _ in range(NUM_CLASSES)])
        logits = 2.5 * np.eye(NUM_CLASSES)[gt].transpose(2, 0, 1) + 6 * noise + 0.5 * rng.normal(size=noise.shape)
        for scale, out in ((1.0, probs), (2.0, refined)):
            z = np.exp(scale * (logits - logits.max(0)))
            out.append((z / z.sum(0)).astype(np.float32))
        core = np.zeros((h, w), bool)
        for c in np.unique(gt):
            core |= ndimage.binary_erosion(gt == c, iterations=max(1, min(h, w) // 10))
        seeds.append(np.where(core & (rng.random((h, w)) < 0.5), gt, IGNORE_INDEX))
        smooth = np.stack([ndimage.gaussian_filter(rng.normal(size=(h, w)), 2.0) for _ in range(dim)])
        features.append(mix[gt_index].transpose(2, 0, 1) + smooth + 0.3 * rng.normal(size=(dim, h, w)))
    return {"probs": np.stack(probs), "refined": np.stack(refined), "seeds": np.stack(seeds).astype(np.int64),
            "present": present, "features": np.stack(features)}


def exact_knn_edges_kdtree(features: np.ndarray, k: int) -> np.ndarray:
    """Exact kNN pairs (E, 2) for low-dimensional features without ties (k-d tree; self among the k)."""
    nodes = features.reshape(features.shape[0], -1).T
    _, index = cKDTree(nodes).query(nodes, k, workers=-1)
    src = np.repeat(np.arange(len(nodes)), k)
    pairs = np.stack([src, index.reshape(-1)], axis=1)
    return pairs[pairs[:, 0] != pairs[:, 1]]


# ----------------------------------------------------------------------------------------------------------------
# Measurements (each in a fresh process)


def _timed(fn, repeat: int) -> tuple[object, float, PeakMemory]:
    with PeakMemory() as memory:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
    for _ in range(repeat - 1):
        start = time.perf_counter()
        fn()
        seconds = min(seconds, time.perf_counter() - start)
    return result, seconds, memory


def measure(stage: str, variant: str, grid: str, out_dir: Path) -> dict:
    # one thread for both variants: scipy's cdist and the Python loops are single-threaded, and on a shared
    # machine torch's extra threads mostly wait for cores
    torch.set_num_threads(THREADS)
    h, w, batch, dim = GRIDS[grid]
    case = make_case(h, w, batch, dim)
    cfg, n = DGCNConfig(), h * w
    record: dict = {"extrapolated": False}
    repeat = 1 if grid == BIG or variant == "baseline" else 3
    if stage == "dsrg":
        fn = (lambda: grow_seeds(case["refined"], case["seeds"], case["present"]).numpy()) if variant == "ours" \
            else (lambda: grow_seeds_baseline(case["refined"], case["seeds"], case["present"]))
        labels, seconds, memory = _timed(fn, repeat)
        np.save(out_dir / f"{stage}_{variant}_{grid}.npy", labels)
    elif stage == "knn" and grid != BIG:
        if variant == "ours":
            fn = lambda: knn_edges(torch.from_numpy(case["features"]), cfg.k)  # noqa: E731
        else:
            fn = lambda: [np.argwhere(knn_matrix_baseline(f, cfg.k)) for f in case["features"]]  # noqa: E731
        edges, seconds, memory = _timed(fn, repeat)
        np.save(out_dir / f"{stage}_{variant}_{grid}.npy", np.concatenate([e + i * n for i, e in enumerate(edges)]))
    elif stage == "knn":
        nodes = case["features"][0].reshape(dim, n).T
        rows = KNN_SAMPLE_ROWS
        if variant == "ours":
            x = torch.from_numpy(nodes)
            sq = (x * x).sum(1)
            block = max(1, DGCNConfig().knn_block_elements // n)
            _, sample_s, memory = _timed(lambda: [knn_rows(x, sq, s, min(s + block, rows), cfg.k)
                                                  for s in range(0, rows, block)], 1)
            record["peak_note"] = "one block of rows (independent of N)"
        else:
            _, sample_s, memory = _timed(lambda: cdist(nodes[:rows], nodes, "sqeuclidean"), 1)
            record["dense_matrix_gb"] = n * n * (8 + 1) / 1e9
        seconds = sample_s * n / rows
        record.update(extrapolated=True, sample_rows=rows, sample_s=sample_s)
    elif stage == "cut":
        if grid == BIG:
            edges = [exact_knn_edges_kdtree(case["features"][0], cfg.k)]
        else:
            edges = knn_edges(torch.from_numpy(case["features"]), cfg.k)
        if variant == "ours":
            def run():
                labels = [graphcut_labels(case["probs"][i], case["seeds"][i], case["present"][i], edges[i], cfg)
                          for i in range(batch)]
                cuts = [{int(c): class_cut(case["probs"][i, c].reshape(-1), case["seeds"][i].reshape(-1) == c,
                                           (case["seeds"][i].reshape(-1) != c) & (case["seeds"][i].reshape(-1)
                                                                                  != IGNORE_INDEX), edges[i], cfg)
                         for c in np.flatnonzero(case["present"][i])} for i in range(batch)]
                return labels, cuts
            # the timed call is the label update alone; the per-class cuts are recomputed for the comparison
            _, seconds, memory = _timed(lambda: [graphcut_labels(case["probs"][i], case["seeds"][i],
                                                                 case["present"][i], edges[i], cfg)
                                                 for i in range(batch)], repeat)
            labels, cuts = run()
        else:
            if grid == BIG:
                neighbour_lists = [np.split(e[:, 1], np.flatnonzero(np.diff(e[:, 0])) + 1) for e in edges]
                knn_dense = None
            else:
                knn_dense = [knn_matrix_baseline(f, cfg.k) for f in case["features"]]

            def run():
                out = []
                for i in range(batch):
                    if knn_dense is not None:
                        neighbours = lambda j, m=knn_dense[i]: np.where(m[j])[0]  # noqa: E731
                    else:
                        neighbours = neighbour_lists[i].__getitem__
                    out.append(graphcut_labels_baseline(case["probs"][i], case["seeds"][i], case["present"][i],
                                                        neighbours, cfg))
                return [o[0] for o in out], [o[1] for o in out]
            (labels, cuts), seconds, memory = _timed(run, repeat)
            if grid == BIG:
                # the reference scans a dense N-long kNN row with np.where per node and class: time a sample
                row = np.zeros(n, bool)
                row[np.random.default_rng(0).choice(n, cfg.k, replace=False)] = True
                start = time.perf_counter()
                for _ in range(SCAN_SAMPLE_ROWS):
                    np.where(row)
                scan_s = (time.perf_counter() - start) / SCAN_SAMPLE_ROWS * n * int(case["present"][0].sum())
                record.update(extrapolated=True, row_scan_s_extrapolated=scan_s, measured_build_cut_s=seconds)
                seconds += scan_s
        np.save(out_dir / f"{stage}_{variant}_{grid}.npy", np.stack(labels))
        flows = {f"{i}:{c}": v[1] for i, d in enumerate(cuts) for c, v in d.items()}
        segments = np.concatenate([d[c][0] for d in cuts for c in sorted(d)])
        np.save(out_dir / f"{stage}_{variant}_{grid}_segments.npy", segments)
        record["flows"] = flows
    else:
        raise ValueError(f"unknown stage {stage!r}")
    record.update(per_image_s=seconds / batch, peak_mib=memory.peak / 2**20, memory_method=memory.method,
                  images=batch, nodes=n)
    return record


def _run(stage: str, variant: str, grid: str, out: str) -> dict:
    return in_fresh_process("bench.graph_labels", "--measure", stage, variant, grid, "--out", out)


def bench_graph_labels(grids: tuple[str, ...] = tuple(GRIDS)) -> dict:
    """Figures per grid and stage: per-image seconds and peak MiB of ours and the baseline, speed-up, agreement."""
    figures: dict = {"threads": THREADS, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        for grid in grids:
            for stage in ("dsrg", "knn", "cut"):
                ours, base = _run(stage, "ours", grid, tmp), _run(stage, "baseline", grid, tmp)
                row = {"ours_s": ours["per_image_s"], "baseline_s": base["per_image_s"],
                       "speedup": base["per_image_s"] / ours["per_image_s"],
                       "ours_peak_mib": ours["peak_mib"], "baseline_peak_mib": base["peak_mib"],
                       "baseline_extrapolated": base["extrapolated"], "ours_extrapolated": ours["extrapolated"]}
                if "dense_matrix_gb" in base:
                    row["baseline_dense_matrices_gb"] = base["dense_matrix_gb"]
                if "row_scan_s_extrapolated" in base:
                    row["baseline_row_scan_s_extrapolated"] = base["row_scan_s_extrapolated"]
                    row["baseline_measured_build_cut_s"] = base["measured_build_cut_s"]
                if stage == "knn" and grid == BIG:
                    row["sample_rows"] = ours["sample_rows"]
                else:
                    a = np.load(Path(tmp) / f"{stage}_ours_{grid}.npy")
                    b = np.load(Path(tmp) / f"{stage}_baseline_{grid}.npy")
                    if stage == "knn":
                        same = a.shape == b.shape and bool((a == b).all())
                        row["edges"], row["edge_lists_identical"] = len(a) / GRIDS[grid][2], same
                    else:
                        row["label_agreement_pct"] = 100 * float((a == b).mean())
                if stage == "cut":
                    sa = np.load(Path(tmp) / f"cut_ours_{grid}_segments.npy")
                    sb = np.load(Path(tmp) / f"cut_baseline_{grid}_segments.npy")
                    row["cut_agreement_pct"] = 100 * float((sa == sb).mean())
                    row["max_rel_flow_diff"] = max(abs(ours["flows"][key] - base["flows"][key])
                                                   / max(abs(base["flows"][key]), 1e-12) for key in base["flows"])
                figures[f"{grid}/{stage}"] = row
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", nargs=3, metavar=("STAGE", "VARIANT", "GRID"), help="internal")
    parser.add_argument("--out", type=Path, help="internal: folder for labels")
    parser.add_argument("--grids", default=",".join(GRIDS), help="comma-separated subset of " + ",".join(GRIDS))
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure, args.out)))
        return
    figures = bench_graph_labels(tuple(args.grids.split(",")))
    for key, value in figures.items():
        if isinstance(value, dict):
            print(key)
            for name, v in value.items():
                print(f"  {name:<34} {v:.4g}" if isinstance(v, float) else f"  {name:<34} {v}")
        else:
            print(f"{key:<36} {value}")


if __name__ == "__main__":
    main()

"""DGCN (Deep Graph Cut Network; hustvl/DGCN ``train.py`` ``generate_supervision``): graph-cut label updates.

Every training iteration, per image, on the output grid (41x41 nodes for a 321 crop):

1. kNN graph over the node features (DGCN: layer1 resized to 41x41 + layer3, 1,280-d): squared Euclidean
   distances; the neighbours of i are all j with d_ij <= the k-th smallest distance of row i (k = 10, i itself
   counted among the ten, ties all included), minus i. Each directed pair i -> j adds an edge of capacity 1 both
   ways (``add_edge(i, j, 1, 1)``), so mutual neighbours are joined by capacity 2.
2. For each class c of the image (background included) an independent binary s-t cut, sink side = "class c":
   seeds of c: source 0 / sink 10; seeds of another class: source 10 / sink 0; other nodes:
   source -log10 p_c / sink -log10(1 - p_c), p = current (detached) floored softmax.
3. Merge: a node takes class c where p_c > 0.7 and the c-cut puts it on the sink side; everywhere else the
   original seed (restarted from the original seeds every iteration, never accumulated).

Deviation, documented: the reference keeps one binary channel per class, so a seed pixel can lose its own class
(its cut puts it on the source side while p_c > 0.7: its terminal capacity 10 is less than the ~18 of its kNN
edges when the neighbours lean elsewhere) or also become positive for a second class. That is not rare: on
random 41x41 kNN graphs (64-d Gaussian features, 3 classes, 20% random seeds, random p), 15-24% of the seeds
(mean 19%, 20 graphs) lose their class; tests/test_graphcut.py holds more than 10% on one such graph. Labels
here are one map per image: seeds always keep their label, and an unseeded node takes the class whose cut and
p > 0.7 test it passes (at most one class when p sums to 1 and the threshold is >= 0.5; otherwise the most
probable).

Graph construction is vectorised (``add_grid_tedges``, ``add_edges`` with whole arrays); the kNN runs in torch on
the features' device, in row blocks. :func:`graphcut_labels_many` spreads images over worker processes.
The losses are DSRG's (:mod:`stages.seed_net.growing`), used with DGCN's constants.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field

import maxflow
import numpy as np
import torch

from data.labelspace import IGNORE_INDEX
from stages.config import TrainSeedNetConfig
from stages.seed_net.growing import (
    CRFRefineConfig,
    LabelStep,
    as_numpy,
    balanced_seed_loss,
    check_label_inputs,
    constrain_loss,
    crf_refine,
    floored_softmax,
)

__all__ = [
    "DGCNConfig",
    "balanced_seed_loss",
    "class_cut",
    "constrain_loss",
    "crf_refine",
    "dgcn_step",
    "floored_softmax",
    "graphcut_labels",
    "graphcut_labels_many",
    "knn_edges",
    "knn_rows",
    "make_pool",
    "update_labels",
]


@dataclass(frozen=True)
class DGCNConfig:
    """DGCN supervision update and losses (hustvl/DGCN train.py unless noted)."""

    # k, seed_capacity and update_threshold are the TrainSeedNet.dgcn_* knobs (DGCN's values, stages/config.py).
    k: int = TrainSeedNetConfig.dgcn_k      # K = 10: neighbours = d <= 10th smallest distance of the row (self incl.)
    edge_capacity: float = 1.0    # g.add_edge(i, j, 1, 1) per directed kNN pair
    seed_capacity: float = TrainSeedNetConfig.dgcn_seed_capacity   # add_tedge(node, 0, 10) for seeds of c, ...
    update_threshold: float = TrainSeedNetConfig.dgcn_update_threshold   # np.where(pred_c > 0.7, cut, cue)
    softmax_floor: float = 1e-7   # softmax(pred, min_prob = 1e-7)
    # Ours: p clipped to [eps, 1 - eps] before -log10 (the reference relies on the softmax floor to stay finite).
    unary_eps: float = 1e-7
    count_floor: float = 1e-4     # cal_seeding_loss: torch.max(count, 0.0001)
    constrain_clip: tuple[float, float] = (0.05, 20.0)   # constrain_loss: clip(Q / p, 0.05, 20)
    # crf_inference(scale_factor=12) with pydensecrf's unary_from_softmax (-log p); probs floored at 1e-4
    crf: CRFRefineConfig = field(default_factory=lambda: CRFRefineConfig(unary="log"))
    knn_block_elements: int = 2**24   # ours, memory only: distances held at once by the kNN (64 MiB fp32)


# ----------------------------------------------------------------------------------------------------------------
# kNN graph


def knn_rows(nodes: torch.Tensor, sq_norms: torch.Tensor, start: int, stop: int, k: int) -> torch.Tensor:
    """kNN pairs (i, j) (int64 (E, 2), on the nodes' device) for rows ``start:stop`` of the distance matrix
    of ``nodes`` (N, D) with squared norms ``sq_norms`` (N,)."""
    dist = nodes[start:stop] @ nodes.T
    # in place: one (rows, N) buffer instead of four temporaries
    dist.mul_(-2.0).add_(sq_norms[start:stop, None]).add_(sq_norms[None, :]).abs_()
    kth = torch.topk(dist, min(k, nodes.shape[0]), dim=1, largest=False).values[:, -1:]
    hit = dist <= kth          # every tie at the k-th distance is a neighbour, as in the reference
    local = torch.arange(stop - start, device=nodes.device)
    hit[local, local + start] = False
    src, dst = torch.nonzero(hit, as_tuple=True)
    return torch.stack([src + start, dst], dim=1)


def knn_edges(features, k: int = 10, block_elements: int = 2**24) -> list[np.ndarray]:
    """Directed kNN pairs per image: ``features`` (B, D, h, w) (or (D, h, w)) -> list of int64 (E, 2) arrays
    of (i, j) node indices (row-major over h x w), j a neighbour of i, sorted by i then j.

    Distances |‖x_i‖² + ‖x_j‖² - 2 x_i·x_j| as in the reference, in the features' dtype and on their device,
    in blocks of rows holding about ``block_elements`` distances (memory O(block), not O(N²); time O(N² D))."""
    x = features if isinstance(features, torch.Tensor) else torch.from_numpy(np.asarray(features))
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"features must have shape (B, D, h, w), got {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        x = x.float()
    if k < 1 or block_elements < 1:
        raise ValueError(f"k and block_elements must be positive, got k={k}, block_elements={block_elements}")
    x = x.detach()
    b, d, h, w = x.shape
    n = h * w
    block_rows = max(1, block_elements // max(n, 1))
    out = []
    for i in range(b):
        nodes = x[i].reshape(d, n).T.contiguous()
        sq = (nodes * nodes).sum(dim=1)
        pairs = [knn_rows(nodes, sq, start, min(start + block_rows, n), k).cpu() for start in range(0, n, block_rows)]
        out.append(torch.cat(pairs).numpy().astype(np.int64) if pairs else np.zeros((0, 2), np.int64))
    return out


# ----------------------------------------------------------------------------------------------------------------
# One image


def class_cut(prob_c: np.ndarray, seed_is_c: np.ndarray, seed_is_other: np.ndarray, edges: np.ndarray,
              cfg: DGCNConfig = DGCNConfig()) -> tuple[np.ndarray, float]:
    """One binary s-t cut over N nodes: ``prob_c`` (N,) p of class c, seed masks (N,) bool, ``edges`` (E, 2).
    Returns (sink side = class c, (N,) bool; max-flow value)."""
    n = prob_c.shape[0]
    p = np.clip(prob_c.astype(np.float64), cfg.unary_eps, 1.0 - cfg.unary_eps)
    source_cap = np.where(seed_is_c, 0.0, np.where(seed_is_other, cfg.seed_capacity, -np.log10(p)))
    sink_cap = np.where(seed_is_c, cfg.seed_capacity, np.where(seed_is_other, 0.0, -np.log10(1.0 - p)))
    graph = maxflow.GraphFloat(n, len(edges))
    nodes = graph.add_grid_nodes((n,))
    graph.add_grid_tedges(nodes, source_cap, sink_cap)
    if len(edges):
        caps = np.full(len(edges), cfg.edge_capacity, np.float64)
        graph.add_edges(np.ascontiguousarray(edges[:, 0]), np.ascontiguousarray(edges[:, 1]), caps, caps)
    flow = graph.maxflow()
    return graph.get_grid_segments(nodes), float(flow)


def graphcut_labels(probs: np.ndarray, seeds: np.ndarray, present: np.ndarray, edges: np.ndarray,
                    cfg: DGCNConfig = DGCNConfig()) -> np.ndarray:
    """DGCN labels (h, w) int64 (255 = ignore) for one image: ``probs`` (C, h, w), original ``seeds`` (h, w),
    ``present`` (C,) bool (background forced on), kNN ``edges`` (E, 2) from :func:`knn_edges`."""
    probs, seeds, present = np.asarray(probs), np.asarray(seeds), np.asarray(present)
    present = check_label_inputs(probs[None], seeds[None], present[None])[0]
    c_total, h, w = probs.shape
    n = h * w
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    if len(edges) and (edges.min() < 0 or edges.max() >= n):
        raise ValueError(f"kNN edges must index the {n} nodes of a {h}x{w} grid")
    p = probs.reshape(c_total, n)
    s = seeds.reshape(n).astype(np.int64)
    unseeded = s == IGNORE_INDEX
    best_p = np.full(n, -np.inf)
    winner = np.full(n, IGNORE_INDEX, np.int64)
    for c in np.flatnonzero(present):
        # A cut can only change nodes that are unseeded and above the threshold; skip it when there are none.
        updatable = unseeded & (p[c] > cfg.update_threshold)
        if not updatable.any():
            continue
        sink, _ = class_cut(p[c], s == c, ~unseeded & (s != c), edges, cfg)
        take = updatable & sink & (p[c] > best_p)
        winner[take] = c
        best_p[take] = p[c][take]
    labels = np.where(unseeded, winner, s)
    return labels.reshape(h, w)


def _graphcut_job(args: tuple) -> np.ndarray:
    return graphcut_labels(*args)


def make_pool(processes: int) -> ProcessPoolExecutor:
    """A pool of ``processes`` spawned workers for :func:`graphcut_labels_many`; create it once per training run
    (spawn, not fork: the parent may hold CUDA and torch threads) and shut it down at the end."""
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    return ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))


def graphcut_labels_many(probs, seeds, present, edges: list[np.ndarray], cfg: DGCNConfig = DGCNConfig(),
                         processes: int = 1, executor: Executor | None = None) -> np.ndarray:
    """:func:`graphcut_labels` for a batch: probs (B, C, h, w), seeds (B, h, w), present (B, C), one edge array per
    image. ``processes=1`` and no ``executor``: inline; else the images go to ``executor`` (or a temporary pool of
    ``processes`` workers). Results are in batch order and identical either way. Returns (B, h, w) int64."""
    probs, seeds, present = as_numpy(probs), as_numpy(seeds), as_numpy(present)
    check_label_inputs(probs, seeds, present)
    if len(edges) != probs.shape[0]:
        raise ValueError(f"{len(edges)} edge arrays for {probs.shape[0]} images")
    jobs = [(probs[i], seeds[i], present[i], edges[i], cfg) for i in range(probs.shape[0])]
    if executor is None and processes <= 1:
        results = [_graphcut_job(job) for job in jobs]
    elif executor is not None:
        results = list(executor.map(_graphcut_job, jobs))
    else:
        with make_pool(min(processes, len(jobs))) as pool:
            results = list(pool.map(_graphcut_job, jobs))
    if not results:
        return np.zeros(seeds.shape, np.int64)
    return np.stack(results)


def update_labels(probs, features, seeds, present, cfg: DGCNConfig = DGCNConfig(), processes: int = 1,
                  executor: Executor | None = None) -> torch.Tensor:
    """DGCN supervision for this iteration: kNN over ``features`` (B, D, h, w) (same grid as ``probs``
    (B, C, h, w); detached), one cut per present class from the original ``seeds`` (B, h, w) (255 = ignore).
    Returns (B, h, w) int64 on the probabilities' device."""
    device = probs.device if isinstance(probs, torch.Tensor) else torch.device("cpu")
    p = as_numpy(probs)
    if tuple(features.shape[-2:]) != tuple(p.shape[-2:]) or features.shape[0] != p.shape[0]:
        raise ValueError(f"features {tuple(features.shape)} must be (B, D, h, w) on the grid of the "
                         f"probabilities {p.shape}")
    edges = knn_edges(features, cfg.k, cfg.knn_block_elements)
    labels = graphcut_labels_many(p, seeds, present, edges, cfg, processes, executor)
    return torch.from_numpy(labels).to(device)


def dgcn_step(logits: torch.Tensor, features: torch.Tensor, images, seeds, present, cfg: DGCNConfig = DGCNConfig(),
              processes: int = 1, executor: Executor | None = None) -> LabelStep:
    """One DGCN iteration from logits (B, C, h, w) and node features (B, D, h, w): floored softmax, graph-cut
    labels, CRF (constrain loss), balanced seed loss + constrain loss."""
    probs = floored_softmax(logits, cfg.softmax_floor)
    labels = update_labels(probs.detach(), features.detach(), seeds, present, cfg, processes, executor)
    refined = crf_refine(probs.detach(), images, cfg.crf)
    seed = balanced_seed_loss(probs, labels.to(logits.device), cfg.count_floor)
    constrain = constrain_loss(probs, refined, cfg.constrain_clip)
    return LabelStep(seed + constrain, seed, constrain, labels.to(logits.device), probs, refined)

"""WSGCN-I propagation (Pan et al., ``Xavier-Pan/WSGCN``): one small GCN per image on IRN's random-walk graph.

Per image, on the stride-4 grid (N = ceil(H/4) * ceil(W/4) nodes):

1. **Graph.** IRN's column-stochastic transition matrix T (boundary affinities, ``beta``, ``radius``; built by
   :mod:`stages.propagation.random_walk`) is raised to the power t, and the GCN adjacency is
   Â = rownorm(max(T^t, (T^t)^T) + I). ``dense`` materialises T^t (N x N, as the reference does; refused above a
   memory cap); ``topk`` keeps the k largest entries of each column of T^t, computed column block by column
   block as T^t e_J with t sparse products, so nothing N x N is ever held. ``topk`` is an approximation of the
   reference (entries outside a column's top k count as 0 on both sides of the max); with k >= N it is exact.
2. **Node features.** IRNet's 160 boundary-branch channels (after ReLU, concatenated) times the weights of its
   final 1x1 boundary conv: each channel's share of the boundary logit (``stages.affinity.train``).
3. **Partial labels** (WSGCN ``gen_partial_label_with_ratio``): CRF on [(1 - max CAM)^alpha; CAMs] of the
   present classes (as WSGCN's ``_crf_with_alpha``, which fills its 21-plane array after the CRF) at stride 4
   with alpha 4 (la) and 32 (ha); label = la argmax, la background -> ignore, ha background -> background; kept
   only where the CAM is confident (top 30% of a class's CAM values above 0.1 inside its own argmax region;
   background where (1 - max)^32 wins the argmax and exceeds 0.8), where the CRF is confident (max of
   [ha background, la classes] >= 0.8) and where the label equals that argmax ("vote").
4. **GCN.** 160 -> 16 -> C (background + the image's classes), ReLU, dropout 0.3, log-softmax; Adam (lr 0.01,
   weight decay 5e-4), 250 full-batch epochs, fresh weights per image. Loss: mean NLL on labelled foreground
   nodes + mean NLL on labelled background nodes + 10 x entropy on unlabelled nodes + 0.01 x tr(Z^T L Z) / N,
   with Z the log-probabilities and L the Laplacian of a 5x5 RGB/XY kernel.
5. **Output.** Z upsampled to the image size (bilinear, align_corners=True, as the reference), exp, argmax.

Deviations from the reference, all deliberate:

- The GCN outputs the image's C classes, not all 21 of VOC; the entropy is still divided by the label space's
  class count (VOC: 21), as the reference's mean over its 21 outputs does, so its weight is unchanged.
- Seeds: one per image, derived from ``gcn_seed`` and the image id (the reference seeds its process once).
- A term whose node set is empty (no labelled foreground, background or unlabelled node) is left out; the
  reference's mean turns NaN there. An image with no labelled node at all is not trained: the caller falls
  back to the CAM label (see :func:`propagate_gcn`).
- Â X is computed once before training (the reference recomputes Â (X W1) each epoch: the same product,
  associated differently).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from data.labelspace import IGNORE_INDEX
from stages.config import PropagateConfig
from stages.metrics import with_background
from stages.propagation.method import AFFINITY_NET, MethodInputs, PropagationMethod
from stages.propagation.random_walk import EdgeList, _quiet_sparse_beta, boundary_affinities, transition_matrix
from stages.refine.crf import dense_crf
from stages.runtime import image_seed
from stages.seeds.rules import _la_ha_label, _power_background

ADJACENCY_MODES = ("dense", "topk")
# WSGCN's Laplacian kernel W_ij = exp(-|rgb_i - rgb_j|^2 / 12 - |xy_i - xy_j|^2 / 20), rgb in [0, 1], xy in
# stride-4 pixels, over a 5x5 window (hard-coded in the reference's dataset code).
LAPLACIAN_RGB_DIVISOR = 12.0
LAPLACIAN_XY_DIVISOR = 20.0
LAPLACIAN_REACH = 2
# dense T^t: matrix_power holds about three N x N float32 matrices at once.
DENSE_COPIES = 3
# topk: columns per block of T^t e_J (N x block float32 states); small blocks keep the sparse products in cache.
TOPK_MAX_BLOCK = 256
TOPK_BLOCK_BYTES = 256 * 2**20


# ------------------------------------------------------------------------------------------------ graph


def dense_walk_power(transition: Tensor, steps: int) -> Tensor:
    """T^steps as a dense (N, N) matrix (the reference's squarings; binary powers for any ``steps``)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    with _quiet_sparse_beta():
        dense = transition.to_dense()
    return torch.linalg.matrix_power(dense, steps)


def topk_walk_power(transition: Tensor, steps: int, k: int, block: int | None = None) -> EdgeList:
    """The ``k`` largest entries of each column of T^steps as (rows, cols, values); zeros are dropped.

    Column block J of T^t is T^t e_J, i.e. ``steps`` sparse products T @ x from the unit vectors: memory is
    O(N * block), time O(steps * nnz(T) * N) in all (the same flops as the walk from every node).
    """
    if steps < 1 or k < 1:
        raise ValueError(f"steps and k must be >= 1, got {steps} and {k}")
    n = transition.shape[0]
    device, dtype = transition.device, transition.dtype
    if block is None:
        block = max(1, min(TOPK_MAX_BLOCK, TOPK_BLOCK_BYTES // (4 * n * 3)))
    keep = min(k, n)
    with _quiet_sparse_beta():
        operator = transition.to_sparse_csr()
    rows, cols, values = [], [], []
    for start in range(0, n, block):
        stop = min(n, start + block)
        columns = torch.arange(start, stop, device=device)
        state = torch.zeros(n, stop - start, device=device, dtype=dtype)
        state[columns, torch.arange(stop - start, device=device)] = 1
        for _ in range(steps):
            state = operator @ state
        top, where = state.topk(keep, dim=0)
        nonzero = top > 0
        rows.append(where[nonzero])
        cols.append(columns.expand(keep, -1)[nonzero])
        values.append(top[nonzero])
    return torch.cat(rows), torch.cat(cols), torch.cat(values)


def _csr(rows: Tensor, cols: Tensor, values: Tensor, n: int) -> Tensor:
    """Sparse CSR (n, n) from entries (summed where repeated)."""
    with _quiet_sparse_beta():
        coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (n, n), check_invariants=False)
        return coo.coalesce().to_sparse_csr()


def symmetric_adjacency_dense(power: Tensor) -> Tensor:
    """WSGCN's Â = rownorm(max(P, P^T) + I) of a dense P (N, N); dense (N, N) result."""
    adjacency = torch.maximum(power, power.T)
    adjacency.diagonal().add_(1)
    return adjacency.div_(adjacency.sum(dim=1, keepdim=True))


def symmetric_adjacency_sparse(num_nodes: int, rows: Tensor, cols: Tensor, values: Tensor) -> Tensor:
    """Â = rownorm(max(P, P^T) + I) for a sparse P given by its entries; sparse CSR (N, N) result."""
    n = num_nodes
    key = torch.cat([rows * n + cols, cols * n + rows])
    both = torch.cat([values, values])
    key, inverse = torch.unique(key, return_inverse=True)
    merged = torch.zeros(key.numel(), dtype=values.dtype, device=values.device)
    merged = merged.scatter_reduce(0, inverse, both, reduce="amax", include_self=False)
    diagonal = torch.arange(n, device=rows.device)
    # The identity goes on top of whatever diagonal the max left (absent entries are 0).
    key = torch.cat([key, diagonal * (n + 1)])
    merged = torch.cat([merged, torch.ones(n, dtype=values.dtype, device=values.device)])
    key, inverse = torch.unique(key, return_inverse=True)
    merged = torch.zeros(key.numel(), dtype=values.dtype, device=values.device).index_add_(0, inverse, merged)
    row, col = key // n, key % n
    row_sums = torch.zeros(n, dtype=torch.float64, device=values.device).index_add_(0, row, merged.double())
    normalised = merged / row_sums.to(merged.dtype)[row]
    return _csr(row, col, normalised, n)


def dense_adjacency_bytes(num_nodes: int) -> int:
    """Peak bytes the dense mode needs for T^t (float32)."""
    return DENSE_COPIES * 4 * num_nodes * num_nodes


def gcn_adjacency(boundary: Tensor, beta: float, radius: int, steps: int, mode: str = "dense", topk: int = 512,
                  dense_max_mib: float = 4096.0, name: str = "image") -> Tensor:
    """WSGCN's adjacency Â (N, N) for a stride-4 boundary map (h, w): dense tensor (``dense``) or CSR (``topk``)."""
    if mode not in ADJACENCY_MODES:
        raise ValueError(f"adjacency mode must be one of {', '.join(ADJACENCY_MODES)}, got {mode!r}")
    if boundary.dim() != 2:
        raise ValueError(f"boundary must be (h, w), got shape {tuple(boundary.shape)}")
    n = boundary.numel()
    transition = transition_matrix(n, *boundary_affinities(boundary, radius), beta)
    if mode == "dense":
        need = dense_adjacency_bytes(n) / 2**20
        if need > dense_max_mib:
            raise ValueError(f"{name}: the dense T^t of its {n}-node stride-4 grid needs about {need:.0f} MiB, above "
                             f"Propagate.gcn_dense_max_mib = {dense_max_mib:g}; set Propagate.gcn_adjacency = topk "
                             "(or raise the cap)")
        return symmetric_adjacency_dense(dense_walk_power(transition, steps))
    return symmetric_adjacency_sparse(n, *topk_walk_power(transition, steps, topk))


# ------------------------------------------------------------------------------------------- node inputs


def downsample_image(rgb: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """The image on the stride-4 grid (h, w, 3) uint8, Lanczos-resized as WSGCN does."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    return cv2.resize(rgb, (grid[1], grid[0]), interpolation=cv2.INTER_LANCZOS4)


def _top_share(score: np.ndarray, region: np.ndarray, fraction: float, floor: float) -> np.ndarray:
    """Pixels of ``region`` above the value at sorted position floor((1 - fraction) n) of the region's values
    above ``floor`` (WSGCN's percentile cut); none when the region has no value above the floor."""
    ranked = np.sort(score[region & (score > floor)])
    cut = math.floor(ranked.size * (1 - fraction))
    if cut >= ranked.size:
        return np.zeros(region.shape, bool)
    return region & (score > ranked[cut])


def partial_labels(rgb_small: np.ndarray, cam: np.ndarray, cfg: PropagateConfig) -> np.ndarray:
    """WSGCN's partial pseudo labels on the stride-4 grid: (h, w) uint8 plane indices (0 = background,
    i = ``cam[i - 1]``) or 255 = unlabelled. ``rgb_small`` (h, w, 3) uint8, ``cam`` (K, h, w) in [0, 1]."""
    cam = np.asarray(cam, np.float32)
    if cam.ndim != 3 or cam.shape[1:] != rgb_small.shape[:2]:
        raise ValueError(f"CAM {cam.shape} does not match the stride-4 image {rgb_small.shape[:2]}")
    crf = {"gaussian": tuple(cfg.gcn_crf_gaussian), "bilateral": tuple(cfg.gcn_crf_bilateral),
           "iterations": cfg.gcn_crf_iterations}
    la = dense_crf(rgb_small, _power_background(cam, cfg.gcn_alpha_low), **crf)
    ha = dense_crf(rgb_small, _power_background(cam, cfg.gcn_alpha_high), **crf)
    label = _la_ha_label(la, ha, np.arange(cam.shape[0] + 1, dtype=np.uint8))

    cam_all = _power_background(cam, cfg.gcn_alpha_high)
    cam_arg = cam_all.argmax(0)
    confident = np.zeros(cam_arg.shape, bool)
    for plane in np.unique(la.argmax(0)):  # only the planes the la CRF keeps, as the reference
        region = cam_arg == plane
        if plane == 0:
            confident |= region & (cam_all[0] > cfg.gcn_bg_confidence)
        else:
            confident |= _top_share(cam_all[plane], region, cfg.gcn_top_fraction, cfg.gcn_cam_floor)
    crf_scores = np.concatenate([ha[:1], la[1:]])
    label[~confident | (crf_scores.max(0) < cfg.gcn_crf_confidence)] = IGNORE_INDEX
    label[label != crf_scores.argmax(0)] = IGNORE_INDEX  # the vote
    return label


def smoothness_edges(rgb_small: np.ndarray) -> EdgeList:
    """Laplacian pairs (src, dst, W_ij) of the 5x5 window, each unordered pair once, nodes row-major."""
    h, w = rgb_small.shape[:2]
    colour = torch.from_numpy(rgb_small.astype(np.float32) / 255)
    srcs, dsts, weights = [], [], []
    for dy in range(LAPLACIAN_REACH + 1):
        for dx in range(-LAPLACIAN_REACH, LAPLACIAN_REACH + 1):
            if dy == 0 and dx <= 0:
                continue
            y1, x0, x1 = h - dy, max(0, -dx), min(w, w - dx)
            if y1 <= 0 or x1 <= x0:
                continue
            here = colour[:y1, x0:x1]
            there = colour[dy:dy + y1, x0 + dx:x1 + dx]
            weight = torch.exp(-((here - there) ** 2).sum(-1) / LAPLACIAN_RGB_DIVISOR
                               - (dy * dy + dx * dx) / LAPLACIAN_XY_DIVISOR)
            ys, xs = torch.arange(y1)[:, None], torch.arange(x0, x1)[None, :]
            src = (ys * w + xs).reshape(-1)
            srcs.append(src)
            dsts.append(src + dy * w + dx)
            weights.append(weight.reshape(-1))
    if not srcs:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty.clone(), torch.zeros(0)
    return torch.cat(srcs), torch.cat(dsts), torch.cat(weights)


@dataclass
class GCNGraph:
    """One image's GCN problem for :func:`train_gcns`.

    ``adjacency`` is Â (N, N), row-stochastic, dense or sparse (any layout); ``labels`` (N,) int64 in [0, C)
    or 255 (0 = background); ``smooth`` the Laplacian pairs (src, dst, weight), each unordered pair once;
    ``entropy_classes`` divides the per-node entropy (the label space's class count; None = C).
    """

    features: Tensor
    adjacency: Tensor
    labels: Tensor
    num_classes: int
    smooth: EdgeList
    seed: int
    entropy_classes: int | None = None
    name: str = "image"

    @property
    def num_nodes(self) -> int:
        return self.features.shape[0]


@dataclass(frozen=True)
class GCNTraining:
    """The GCN's hyperparameters: the ``Propagate.gcn_*`` knobs (WSGCN's values), whose defaults they take."""

    hidden: int = PropagateConfig.gcn_hidden
    dropout: float = PropagateConfig.gcn_dropout
    lr: float = PropagateConfig.gcn_lr
    weight_decay: float = PropagateConfig.gcn_weight_decay
    epochs: int = PropagateConfig.gcn_epochs
    entropy_weight: float = PropagateConfig.gcn_entropy_weight
    smooth_weight: float = PropagateConfig.gcn_smooth_weight

    @classmethod
    def from_config(cls, cfg: PropagateConfig) -> GCNTraining:
        return cls(cfg.gcn_hidden, cfg.gcn_dropout, cfg.gcn_lr, cfg.gcn_weight_decay, cfg.gcn_epochs,
                   cfg.gcn_entropy_weight, cfg.gcn_smooth_weight)


def _check_graph(graph: GCNGraph) -> None:
    n = graph.num_nodes
    if graph.features.dim() != 2 or n < 1:
        raise ValueError(f"{graph.name}: features must be (N, F) with N >= 1, got {tuple(graph.features.shape)}")
    if tuple(graph.adjacency.shape) != (n, n):
        raise ValueError(f"{graph.name}: adjacency is {tuple(graph.adjacency.shape)} for {n} nodes")
    if tuple(graph.labels.shape) != (n,):
        raise ValueError(f"{graph.name}: labels are {tuple(graph.labels.shape)} for {n} nodes")
    if graph.num_classes < 1:
        raise ValueError(f"{graph.name}: num_classes must be >= 1, got {graph.num_classes}")
    labelled = graph.labels[graph.labels != IGNORE_INDEX]
    if labelled.numel() == 0:
        raise ValueError(f"{graph.name}: no labelled node to train on (fall back to the CAM label)")
    if labelled.min() < 0 or labelled.max() >= graph.num_classes:
        raise ValueError(f"{graph.name}: labels must lie in [0, {graph.num_classes}) or be {IGNORE_INDEX}")


class _SparseProduct(torch.autograd.Function):
    """A @ x for a constant sparse A, backward A^T @ g with A^T stored (CSR products are the fast ones)."""

    @staticmethod
    def forward(ctx, matrix: Tensor, transposed: Tensor, x: Tensor) -> Tensor:
        ctx.transposed = transposed
        return matrix @ x

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, None, Tensor]:
        return None, None, ctx.transposed @ grad


class _DenseProduct(torch.autograd.Function):
    """A @ x for a constant dense A with x of a few columns (the GCN's classes), as (x^T @ A^T)^T, and backward
    A^T @ g as (g^T @ A)^T. The same sums; on the CPU the BLAS runs these wide-output forms several times faster
    than autograd's A @ x and A^T @ g, whose backward alone made three quarters of an image's training time
    (``python -m bench.gcn``: forward + backward per epoch on 4,032 nodes)."""

    @staticmethod
    def forward(ctx, matrix: Tensor, x: Tensor) -> Tensor:
        ctx.matrix = matrix
        return (x.T @ matrix.T).T

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor]:
        return None, (grad.T @ ctx.matrix).T


class _BlockAdjacency:
    """Â of several graphs as one operator on their stacked nodes: one block-diagonal CSR matrix for the sparse
    ones, a dense product per dense one (T^t from the dense mode has no zeros worth skipping)."""

    def __init__(self, graphs: Sequence[GCNGraph], offsets: Sequence[int], total: int, device: torch.device):
        self.total = total
        dense_ids = {i for i, g in enumerate(graphs) if g.adjacency.layout == torch.strided}
        self.dense = [(offsets[i], graphs[i].adjacency.to(device, torch.float32)) for i in sorted(dense_ids)]
        rows, cols, vals = [], [], []
        with _quiet_sparse_beta():
            for i, g in enumerate(graphs):
                if i in dense_ids:
                    continue
                coo = g.adjacency.to_sparse_coo().coalesce()
                rows.append(coo.indices()[0].to(device) + offsets[i])
                cols.append(coo.indices()[1].to(device) + offsets[i])
                vals.append(coo.values().to(device))
            self.sparse = None
            if rows:
                r, c, v = torch.cat(rows), torch.cat(cols), torch.cat(vals)
                self.sparse, self.sparse_t = _csr(r, c, v, total), _csr(c, r, v, total)

    def __call__(self, x: Tensor) -> Tensor:
        out = _SparseProduct.apply(self.sparse, self.sparse_t, x) if self.sparse is not None else None
        if not self.dense:
            return out
        # Dense graphs' rows are empty in the block matrix: replace them by their own products.
        pieces, at = [], 0
        for offset, matrix in self.dense:
            if offset > at:
                pieces.append(out[at:offset])
            pieces.append(_DenseProduct.apply(matrix, x[offset:offset + matrix.shape[0]]))
            at = offset + matrix.shape[0]
        if at < self.total:
            pieces.append(out[at:])
        return torch.cat(pieces)

    def constant(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self(x)


def _uniform(generator: torch.Generator, shape: tuple[int, ...], bound: float, device: torch.device) -> Tensor:
    return (torch.rand(shape, generator=generator, device=device) * 2 - 1) * bound


def train_gcns(graphs: Sequence[GCNGraph], training: GCNTraining | None = None,
               device: torch.device | str | None = None) -> list[Tensor]:
    """Train one fresh 2-layer GCN per graph, all in one forward per epoch; returns their log-probabilities
    (C_g, N_g) per graph, in eval mode after the last epoch, on the CPU.

    The graphs form one block-diagonal operator and each graph has its own weights, slices of batched tensors
    (G, ...) padded to the largest graph and class count (padded classes masked to -inf). The loss is the sum of
    the per-graph losses and Adam is elementwise, so each GCN follows exactly the updates it would get alone;
    initial weights and dropout masks come from a generator seeded by ``graph.seed``. ``device`` defaults to
    CUDA when present.
    """
    training = training or GCNTraining()
    if not graphs:
        return []
    for graph in graphs:
        _check_graph(graph)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    count = len(graphs)
    sizes = [g.num_nodes for g in graphs]
    classes = [g.num_classes for g in graphs]
    feature_dim = graphs[0].features.shape[1]
    if any(g.features.shape[1] != feature_dim for g in graphs):
        raise ValueError("all graphs must have the same feature width")
    offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    total, widest, most = offsets[-1], max(sizes), max(classes)
    hidden = training.hidden

    adjacency = _BlockAdjacency(graphs, offsets, total, dev)
    features = torch.cat([g.features.to(dev, torch.float32) for g in graphs])
    aggregated = adjacency.constant(features)                       # Â X, fixed during training
    node_graph = torch.repeat_interleave(torch.arange(count, device=dev), torch.tensor(sizes, device=dev))
    node_slot = torch.cat([torch.arange(n, device=dev) for n in sizes])
    flat_index = node_graph * widest + node_slot                    # node -> row of the padded (G * widest) layout
    padded_input = torch.zeros(count * widest, feature_dim, device=dev).index_copy_(0, flat_index, aggregated)
    padded_input = padded_input.view(count, widest, feature_dim)

    labels = torch.cat([g.labels.to(dev, torch.long) for g in graphs])
    class_valid = torch.arange(most, device=dev)[None, :] < torch.tensor(classes, device=dev)[:, None]
    node_classes = class_valid[node_graph]
    labelled = labels != IGNORE_INDEX
    fg, bg, unlabelled = labelled & (labels > 0), labelled & (labels == 0), ~labelled
    safe_labels = torch.where(labelled, labels, 0)
    entropy_div = torch.tensor([float(g.entropy_classes or g.num_classes) for g in graphs], device=dev)
    sizes_t = torch.tensor(sizes, dtype=torch.float32, device=dev)
    src, dst, weight, edge_graph = [], [], [], []
    for i, g in enumerate(graphs):
        s, d, w = g.smooth
        src.append(s.to(dev) + offsets[i])
        dst.append(d.to(dev) + offsets[i])
        weight.append(w.to(dev, torch.float32))
        edge_graph.append(torch.full((s.numel(),), i, device=dev))
    src, dst, weight, edge_graph = (torch.cat(x) for x in (src, dst, weight, edge_graph))

    # pygcn's initialisation, uniform +-1/sqrt(fan_out), drawn per graph from its own generator.
    generators = []
    w1 = torch.zeros(count, feature_dim, hidden, device=dev)
    b1 = torch.zeros(count, hidden, device=dev)
    w2 = torch.zeros(count, hidden, most, device=dev)
    b2 = torch.zeros(count, most, device=dev)
    for i, g in enumerate(graphs):
        gen = torch.Generator(device=dev)
        gen.manual_seed(g.seed)
        generators.append(gen)
        w1[i] = _uniform(gen, (feature_dim, hidden), 1 / math.sqrt(hidden), dev)
        b1[i] = _uniform(gen, (hidden,), 1 / math.sqrt(hidden), dev)
        w2[i, :, :g.num_classes] = _uniform(gen, (hidden, g.num_classes), 1 / math.sqrt(g.num_classes), dev)
        b2[i, :g.num_classes] = _uniform(gen, (g.num_classes,), 1 / math.sqrt(g.num_classes), dev)
    params = [p.requires_grad_() for p in (w1, b1, w2, b2)]
    optimizer = torch.optim.Adam(params, lr=training.lr, weight_decay=training.weight_decay)

    def per_graph_mean(values: Tensor, mask: Tensor) -> Tensor:
        sums = torch.zeros(count, device=dev).index_add(0, node_graph, torch.where(mask, values, 0))
        counts = torch.zeros(count, device=dev).index_add_(0, node_graph, mask.float())
        return torch.where(counts > 0, sums / counts.clamp(min=1), 0)

    def forward(train: bool) -> Tensor:
        h1 = torch.relu(torch.baddbmm(b1[:, None, :], padded_input, w1))     # (G, widest, hidden)
        if train and training.dropout > 0:
            keep = torch.ones(count, widest, hidden, device=dev)
            for i, gen in enumerate(generators):
                draw = torch.rand(sizes[i], hidden, generator=gen, device=dev)
                keep[i, :sizes[i]] = (draw >= training.dropout).float() / (1 - training.dropout)
            h1 = h1 * keep
        support = torch.bmm(h1, w2).reshape(count * widest, most)[flat_index]
        logits = adjacency(support) + b2[node_graph]
        return torch.log_softmax(logits.masked_fill(~node_classes, float("-inf")), dim=1)

    for _ in range(training.epochs):
        optimizer.zero_grad(set_to_none=True)
        log_probs = forward(train=True)
        valid = log_probs.masked_fill(~node_classes, 0)
        nll = -valid.gather(1, safe_labels[:, None])[:, 0]
        entropy = -(valid.exp() * valid).masked_fill(~node_classes, 0).sum(1) / entropy_div[node_graph]
        diff = ((valid[src] - valid[dst]) ** 2).sum(1) * weight
        smooth = torch.zeros(count, device=dev).index_add(0, edge_graph, diff) / sizes_t
        loss = (per_graph_mean(nll, fg) + per_graph_mean(nll, bg)
                + training.entropy_weight * per_graph_mean(entropy, unlabelled) + training.smooth_weight * smooth)
        loss.sum().backward()
        optimizer.step()

    with torch.no_grad():
        log_probs = forward(train=False)
    return [log_probs[offsets[i]:offsets[i + 1], :g.num_classes].T.contiguous().cpu() for i, g in enumerate(graphs)]


# ------------------------------------------------------------------------------------------------ per image


def gcn_output(log_probs: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (C, H, W) float32, argmax (H, W) uint8) from stride-4 log-probabilities (C, h * w):
    bilinear with align_corners=True on the log-probabilities, then exp (the reference's order)."""
    c = log_probs.shape[0]
    grid_z = log_probs.reshape(1, c, *grid).float()
    upsampled = F.interpolate(grid_z, size=tuple(size), mode="bilinear", align_corners=True)[0]
    probs = upsampled.exp()
    return probs.numpy().astype(np.float32), probs.argmax(0).to(torch.uint8).numpy()


def build_graph(cfg: PropagateConfig, rgb: np.ndarray, cam: np.ndarray, boundary: np.ndarray,
                features: np.ndarray, image_id: str, entropy_classes: int | None = None,
                device: torch.device | str | None = None) -> GCNGraph:
    """One image's :class:`GCNGraph`: ``cam`` (K, h, w) stride-4 CAMs, ``boundary`` (h, w), ``features``
    (F, h, w) IRNet's weighted boundary features, ``rgb`` the full image; labels from :func:`partial_labels`."""
    cam = np.asarray(cam, np.float32)
    grid = tuple(boundary.shape)
    if cam.ndim != 3 or cam.shape[1:] != grid:
        raise ValueError(f"{image_id}: CAM {cam.shape} does not match the boundary grid {grid}")
    if features.ndim != 3 or features.shape[1:] != grid:
        raise ValueError(f"{image_id}: boundary features {features.shape} do not match the boundary grid {grid}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    rgb_small = downsample_image(rgb, grid)
    labels = partial_labels(rgb_small, cam, cfg)
    adjacency = gcn_adjacency(torch.as_tensor(boundary, dtype=torch.float32, device=dev), cfg.beta, cfg.radius,
                              cfg.gcn_walk_steps, cfg.gcn_adjacency, cfg.gcn_topk, cfg.gcn_dense_max_mib,
                              name=f"image {image_id!r}")
    node_features = torch.as_tensor(features, dtype=torch.float32).reshape(features.shape[0], -1).T.contiguous()
    return GCNGraph(features=node_features, adjacency=adjacency, labels=torch.from_numpy(labels.reshape(-1)).long(),
                    num_classes=cam.shape[0] + 1, smooth=smoothness_edges(rgb_small),
                    seed=image_seed(cfg.gcn_seed, image_id), entropy_classes=entropy_classes,
                    name=f"image {image_id!r}")


def propagate_gcn(cfg: PropagateConfig, cam: np.ndarray, cam_high: np.ndarray, boundary: np.ndarray,
                  features: np.ndarray, rgb: np.ndarray, image_id: str, size: tuple[int, int],
                  device: torch.device | str | None = None, entropy_classes: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """WSGCN-I on one image: (scores (K+1, H, W) float32 background first, label index (H, W) uint8).

    An image whose partial labels are all unlabelled gets no GCN: it keeps the CAM label's scores (a constant
    background plane ``cam_bg_threshold`` before the full-resolution CAMs), as Propagate does for empty seeds.
    """
    height, width = size
    grid = (math.ceil(height / 4), math.ceil(width / 4))
    if tuple(boundary.shape) != grid:
        raise ValueError(f"{image_id}: boundary {boundary.shape} is not the stride-4 grid {grid} of {size}")
    if np.asarray(cam).shape[0] == 0:  # no class: everything is background
        return np.ones((1, height, width), np.float32), np.zeros((height, width), np.uint8)
    graph = build_graph(cfg, rgb, cam, boundary, features, image_id, entropy_classes, device)
    if not bool((graph.labels != IGNORE_INDEX).any()):
        scores = with_background(np.asarray(cam_high, np.float32), cfg.cam_bg_threshold)
        return scores, scores.argmax(0).astype(np.uint8)
    (log_probs,) = train_gcns([graph], GCNTraining.from_config(cfg), device)
    return gcn_output(log_probs, grid, size)


def validate_gcn_config(cfg: PropagateConfig) -> None:
    """Reject GCN knobs no run can use, naming the key."""
    if cfg.gcn_adjacency not in ADJACENCY_MODES:
        raise ValueError(f"Propagate.gcn_adjacency = {cfg.gcn_adjacency!r}; choose one of {', '.join(ADJACENCY_MODES)}")
    for key in ("gcn_walk_steps", "gcn_topk", "gcn_hidden", "gcn_epochs", "gcn_crf_iterations"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"Propagate.{key} must be >= 1, got {getattr(cfg, key)}")
    for key in ("gcn_alpha_low", "gcn_alpha_high", "gcn_lr", "gcn_dense_max_mib"):
        if not getattr(cfg, key) > 0:
            raise ValueError(f"Propagate.{key} must be > 0, got {getattr(cfg, key)}")
    for key in ("gcn_weight_decay", "gcn_entropy_weight", "gcn_smooth_weight"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"Propagate.{key} must be >= 0, got {getattr(cfg, key)}")
    for key in ("gcn_cam_floor", "gcn_bg_confidence", "gcn_crf_confidence"):
        if not 0 <= getattr(cfg, key) <= 1:
            raise ValueError(f"Propagate.{key} must lie in [0, 1], got {getattr(cfg, key)}")
    if not 0 < cfg.gcn_top_fraction <= 1:
        raise ValueError(f"Propagate.gcn_top_fraction must lie in (0, 1], got {cfg.gcn_top_fraction}")
    if not 0 <= cfg.gcn_dropout < 1:
        raise ValueError(f"Propagate.gcn_dropout must lie in [0, 1), got {cfg.gcn_dropout}")
    if len(cfg.gcn_crf_gaussian) != 2 or cfg.gcn_crf_gaussian[0] <= 0:
        raise ValueError(f"Propagate.gcn_crf_gaussian must be (sxy > 0, compat), got {cfg.gcn_crf_gaussian}")
    if len(cfg.gcn_crf_bilateral) != 3 or min(cfg.gcn_crf_bilateral[:2]) <= 0:
        raise ValueError("Propagate.gcn_crf_bilateral must be (sxy > 0, srgb > 0, compat), "
                         f"got {cfg.gcn_crf_bilateral}")


def run(cfg: PropagateConfig, cams: dict[str, np.ndarray], inputs: dict[str, np.ndarray],
        size: tuple[int, int], device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """WSGCN-I: a GCN per image on rownorm(max(T^t, T^t^T) + I), trained on CRF/CAM partial labels."""
    missing = {"boundary", "boundary_features", "rgb", "image_id"} - set(inputs)
    if missing:
        raise ValueError(f"propagation gcn needs {', '.join(sorted(missing))} in its inputs (IRNet's boundary "
                         "features and the image, as propagate_images passes them)")
    num_labels = int(inputs["num_labels"]) if "num_labels" in inputs else None
    return propagate_gcn(cfg, cams["cam"], cams["high_res"], inputs["boundary"], inputs["boundary_features"],
                         inputs["rgb"], str(inputs["image_id"]), size, device, entropy_classes=num_labels)


METHOD = PropagationMethod(
    name="gcn", run=run, trained_by=AFFINITY_NET, affinity_method="irnet",
    inputs=MethodInputs(boundary_features=True, image=True), validate=validate_gcn_config,
    final_crf="wsgcn_final", reference="WSGCN-I, Pan et al. ICME 2021 (WSGCN)")

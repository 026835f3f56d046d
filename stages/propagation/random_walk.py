"""Random walk over pixel affinities (IRN's ``rw_irn`` and AffinityNet's ``rw_psa`` propagation).

Both references build a dense N x N affinity matrix A (A_ij = A_ji = a_ij for the radius-r half-disc pairs,
A_ii = 1), take A^beta elementwise, normalise each **column** to sum 1 (T = A^beta D^-1) and square T eight
times to get T^256, then propagate row vectors x <- x T^256. A 500x375 image at stride 4 has N = 11,750 nodes,
so every dense matrix is 0.55 GB and the squarings cost ~26 TFLOP. Here T stays sparse (~69 entries per
column) and the walk is ``steps`` sparse products x <- x T: the same numbers up to float rounding, at a
fraction of the time and memory, and for any image size (no 512 px padding).

Nodes are numbered row-major: node = y * w + x.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models.pairs import half_disc_offsets, line_path

EdgeList = tuple[Tensor, Tensor, Tensor]  # (src, dst, weight): int64 node ids and float affinities


def _source_window(h: int, w: int, dy: int, dx: int, row_stop: int, col_start: int, col_stop: int
                   ) -> tuple[int, int, int, int]:
    """Rows [y0, y1) and columns [x0, x1) of sources whose partner (y + dy, x + dx) is on the grid."""
    y0, y1 = 0, min(row_stop, h - dy)
    x0, x1 = max(col_start, -dx), min(col_stop, w - max(dx, 0))
    return y0, y1, x0, x1


def _window_edges(y0: int, y1: int, x0: int, x1: int, dy: int, dx: int, w: int, device: torch.device
                  ) -> tuple[Tensor, Tensor]:
    ys = torch.arange(y0, y1, device=device)
    xs = torch.arange(x0, x1, device=device)
    src = (ys[:, None] * w + xs[None, :]).reshape(-1)
    return src, src + (dy * w + dx)


def _concat_edges(parts: list[EdgeList], device: torch.device, dtype: torch.dtype) -> EdgeList:
    if not parts:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty.clone(), torch.zeros(0, dtype=dtype, device=device)
    src, dst, weight = zip(*parts)
    return torch.cat(src), torch.cat(dst), torch.cat(weight)


def boundary_affinities(boundary: Tensor, radius: int) -> EdgeList:
    """IRN's pair affinities a_ij = 1 - max of the boundary map over the line path from i to j.

    Every half-disc pair with both ends on the grid is returned. IRN pads B with 1.0 so pairs reaching
    outside get affinity 0, then crops those nodes away; since a line path never leaves its pair's bounding
    box, dropping the outside pairs gives the same cropped graph.
    """
    if boundary.dim() != 2:
        raise ValueError(f"boundary must be (h, w), got shape {tuple(boundary.shape)}")
    h, w = boundary.shape
    parts = []
    for dy, dx in half_disc_offsets(radius):
        y0, y1, x0, x1 = _source_window(h, w, dy, dx, h, 0, w)
        if y1 <= y0 or x1 <= x0:
            continue
        path_max = None
        for py, px in line_path(dy, dx):
            window = boundary[y0 + py:y1 + py, x0 + px:x1 + px]
            path_max = window if path_max is None else torch.maximum(path_max, window)
        src, dst = _window_edges(y0, y1, x0, x1, dy, dx, w, boundary.device)
        parts.append((src, dst, (1 - path_max).reshape(-1)))
    return _concat_edges(parts, boundary.device, boundary.dtype)


def feature_affinities(features: Tensor, radius: int, interior_sources: bool = True) -> EdgeList:
    """AffinityNet's pair affinities a_ij = exp(-mean_c |f_ic - f_jc|) over the half-disc pairs.

    PSA's inference only takes sources in rows [0, h - (r-1)) and columns [r-1, w - (r-1)), so pixels near
    the left, right and bottom borders lose some pairs; ``interior_sources=False`` takes every source.
    """
    if features.dim() != 3:
        raise ValueError(f"features must be (C, h, w), got shape {tuple(features.shape)}")
    _, h, w = features.shape
    reach = radius - 1
    row_stop, col_start, col_stop = (h - reach, reach, w - reach) if interior_sources else (h, 0, w)
    parts = []
    for dy, dx in half_disc_offsets(radius):
        y0, y1, x0, x1 = _source_window(h, w, dy, dx, row_stop, col_start, col_stop)
        if y1 <= y0 or x1 <= x0:
            continue
        here = features[:, y0:y1, x0:x1]
        there = features[:, y0 + dy:y1 + dy, x0 + dx:x1 + dx]
        weight = torch.exp(-(here - there).abs().mean(dim=0))
        src, dst = _window_edges(y0, y1, x0, x1, dy, dx, w, features.device)
        parts.append((src, dst, weight.reshape(-1)))
    return _concat_edges(parts, features.device, features.dtype)


def _check_graph(num_nodes: int, src: Tensor, dst: Tensor, weight: Tensor, beta: float) -> None:
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
    if not (src.shape == dst.shape == weight.shape) or src.dim() != 1:
        raise ValueError(f"src, dst and weight must be 1-D of one length, got shapes {tuple(src.shape)}, "
                         f"{tuple(dst.shape)}, {tuple(weight.shape)}")
    if src.numel() and (min(src.min(), dst.min()) < 0 or max(src.max(), dst.max()) >= num_nodes):
        raise ValueError(f"src/dst hold node ids outside [0, {num_nodes})")


@contextlib.contextmanager
def _quiet_sparse_beta() -> Iterator[None]:
    """Silence torch's "CSR/CSC support is in beta" notice: CSR products are ~30x faster than COO here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Sparse CS[RC] tensor support is in beta")
        yield


def transition_matrix(num_nodes: int, src: Tensor, dst: Tensor, weight: Tensor, beta: float) -> Tensor:
    """Sparse column-stochastic T = A^beta D^-1 (A symmetric with unit diagonal, D = its column sums).

    Returned in sparse CSC layout, shape (num_nodes, num_nodes), int32 indices where they fit; pairs listed
    twice add up. Never densified.
    """
    _check_graph(num_nodes, src, dst, weight, beta)
    n = num_nodes
    diagonal = torch.arange(n, device=src.device)
    powered = weight.clamp(min=0) ** beta
    # Column-major keys col * n + row: one sort orders the entries for CSC (and finds repeated pairs).
    key, order = torch.sort(torch.cat([dst * n + src, src * n + dst, diagonal * (n + 1)]))
    values = torch.cat([powered, powered, torch.ones(n, dtype=weight.dtype, device=weight.device)])[order]
    del order
    if key.numel() > 1 and bool((key[1:] == key[:-1]).any()):
        key, inverse = torch.unique_consecutive(key, return_inverse=True)
        values = torch.zeros(key.numel(), dtype=values.dtype, device=values.device).index_add_(0, inverse, values)
    index_dtype = torch.int32 if key.numel() < 2**31 and n < 2**31 else torch.int64
    cols = (key // n).to(index_dtype)
    rows = (key % n).to(index_dtype)
    del key
    col_starts = torch.zeros(n + 1, dtype=torch.int64, device=src.device)
    col_starts[1:] = torch.cumsum(torch.bincount(cols, minlength=n), 0)
    # Sums in float64: a column summing to 1 + 1e-6 (float32 accumulation) compounds to ~1e-4 over 256 steps.
    column_sums = torch.zeros(n, dtype=torch.float64, device=values.device).index_add_(0, cols, values.double())
    normalised = values * (1 / column_sums).to(values.dtype)[cols]
    with _quiet_sparse_beta():
        return torch.sparse_csc_tensor(col_starts.to(index_dtype), rows, normalised, (n, n), check_invariants=False)


def random_walk(transition: Tensor, seeds: Tensor, steps: int) -> Tensor:
    """x T^steps for each row x of ``seeds`` (C, N), as ``steps`` sparse products x <- x T.

    ``transition`` may be in any sparse layout; CSC (as ``transition_matrix`` gives) is used without a copy.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    n = transition.shape[0]
    if seeds.dim() != 2 or seeds.shape[1] != n:
        raise ValueError(f"seeds must be (C, {n}) for a {n}-node transition matrix, got {tuple(seeds.shape)}")
    with _quiet_sparse_beta():
        if transition.layout != torch.sparse_csc:
            transition = transition.to_sparse_csc()
        # x T = (T^t x^t)^t, and T's CSC arrays are exactly T^t in CSR: one row-wise product per step.
        operator = torch.sparse_csr_tensor(transition.ccol_indices(), transition.row_indices(),
                                           transition.values(), transition.shape, check_invariants=False)
    state = seeds.t().contiguous()
    for _ in range(steps):
        state = operator @ state
    return state.t().contiguous()


def random_walk_dense(num_nodes: int, src: Tensor, dst: Tensor, weight: Tensor, beta: float, steps: int,
                      seeds: Tensor) -> Tensor:
    """Reference only (tests, bench): the references' dense walk, x T^steps with T^steps by squaring.

    Dense A, elementwise power, column normalisation, log2(steps) squarings, one product. Memory is several
    N x N matrices and time O(N^3 log steps): not for production.
    """
    _check_graph(num_nodes, src, dst, weight, beta)
    if steps < 1 or steps & (steps - 1):
        raise ValueError(f"steps must be a power of two for the squaring reference, got {steps}")
    affinity = torch.zeros(num_nodes, num_nodes, dtype=weight.dtype, device=weight.device)
    affinity.index_put_((src, dst), weight, accumulate=True)
    affinity.index_put_((dst, src), weight, accumulate=True)
    affinity.fill_diagonal_(1.0)
    transition = affinity.clamp(min=0) ** beta
    transition = transition / transition.sum(dim=0, keepdim=True)
    for _ in range(int(math.log2(steps))):
        transition = transition @ transition
    return seeds @ transition


def _device(device: torch.device | str | None) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def _check_walk(beta: float, steps: int, radius: int) -> None:
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if radius < 2:
        raise ValueError(f"radius must be >= 2, got {radius}")


def _walk(edges: EdgeList, num_nodes: int, seeds: Tensor, beta: float, steps: int, dense_reference: bool
          ) -> Tensor:
    src, dst, weight = edges
    if dense_reference:
        return random_walk_dense(num_nodes, src, dst, weight, beta, steps, seeds)
    return random_walk(transition_matrix(num_nodes, src, dst, weight, beta), seeds, steps)


def propagate_irn(cam: np.ndarray, boundary: np.ndarray, image_size: tuple[int, int], beta: float = 10.0,
                  steps: int = 256, radius: int = 5, bg_threshold: float = 0.25,
                  device: torch.device | str | None = None, dense_reference: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
    """IRN's semantic propagation: returns (scores (K+1, H, W) float32, label (H, W) uint8).

    ``cam`` is the stride-4 CAM (K, ceil(H/4), ceil(W/4)) of the K present classes, ``boundary`` the
    boundary map B on the same grid. Seeds cam * (1 - B) walk over a_ij = 1 - max B on the path; the result
    is upsampled x4 (bilinear), cropped, divided by its global max and preceded by a constant background
    plane ``bg_threshold``. Label values index [background, *classes]. ``dense_reference`` swaps in the
    dense squaring reference (tests, bench).
    """
    _check_walk(beta, steps, radius)
    height, width = image_size
    grid = (math.ceil(height / 4), math.ceil(width / 4))
    if cam.ndim != 3 or cam.shape[1:] != grid:
        raise ValueError(f"cam must be (K, {grid[0]}, {grid[1]}) for image size {image_size}, got {cam.shape}")
    if boundary.shape != grid:
        raise ValueError(f"boundary must be {grid} for image size {image_size}, got {boundary.shape}")
    dev = _device(device)
    edge_map = torch.as_tensor(boundary, dtype=torch.float32, device=dev)
    cams = torch.as_tensor(cam, dtype=torch.float32, device=dev)
    num_classes, num_nodes = cams.shape[0], grid[0] * grid[1]
    seeds = (cams * (1 - edge_map)).reshape(num_classes, num_nodes)
    if num_classes:
        walked = _walk(boundary_affinities(edge_map, radius), num_nodes, seeds, beta, steps, dense_reference)
        walked = F.interpolate(walked.reshape(1, num_classes, *grid), scale_factor=4, mode="bilinear",
                               align_corners=False)[0, :, :height, :width]
        peak = walked.max()
        # IRN divides by the max unguarded; all-zero seeds would give NaN, here they stay 0 (all background).
        walked = walked / peak if peak > 0 else walked
    else:
        walked = torch.zeros(0, height, width, device=dev)
    scores = torch.cat([torch.full((1, height, width), float(bg_threshold), device=dev), walked])
    return scores.cpu().numpy().astype(np.float32), scores.argmax(dim=0).to(torch.uint8).cpu().numpy()


def propagate_psa(cam_high: np.ndarray, features: np.ndarray, alpha: float = 16.0, beta: float = 8.0,
                  steps: int = 256, radius: int = 5, device: torch.device | str | None = None,
                  interior_sources: bool = True, dense_reference: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """AffinityNet's random walk: returns (scores (K+1, H, W) float32, label (H, W) uint8).

    ``cam_high`` is the full-resolution CAM (K, H, W) in [0, 1], ``features`` AffinityNet's stride-8 map
    (C, ceil(H/8), ceil(W/8)). Background (1 - max CAM)^alpha is propagated as channel 0 with the classes;
    all are zero-padded to a multiple of 8, 8x8 average-pooled, walked, upsampled (bilinear) to the padded
    size and cropped. Scores are not normalised. Label values index [background, *classes].
    """
    _check_walk(beta, steps, radius)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if cam_high.ndim != 3:
        raise ValueError(f"cam_high must be (K, H, W), got shape {cam_high.shape}")
    height, width = cam_high.shape[1:]
    grid = (math.ceil(height / 8), math.ceil(width / 8))
    if features.ndim != 3 or features.shape[1:] != grid:
        raise ValueError(f"features must be (C, {grid[0]}, {grid[1]}) for CAMs of size {(height, width)}, "
                         f"got {features.shape}")
    dev = _device(device)
    cams = torch.as_tensor(cam_high, dtype=torch.float32, device=dev)
    strongest = cams.amax(dim=0) if cams.shape[0] else torch.zeros(height, width, device=dev)
    planes = torch.cat([((1 - strongest) ** alpha)[None], cams])
    padded = (grid[0] * 8, grid[1] * 8)
    planes = F.pad(planes, (0, padded[1] - width, 0, padded[0] - height))
    num_planes, num_nodes = planes.shape[0], grid[0] * grid[1]
    seeds = F.avg_pool2d(planes[None], 8)[0].reshape(num_planes, num_nodes)
    feats = torch.as_tensor(features, dtype=torch.float32, device=dev)
    walked = _walk(feature_affinities(feats, radius, interior_sources), num_nodes, seeds, beta, steps,
                   dense_reference)
    scores = F.interpolate(walked.reshape(1, num_planes, *grid), size=padded, mode="bilinear",
                           align_corners=False)[0, :, :height, :width]
    return scores.cpu().numpy().astype(np.float32), scores.argmax(dim=0).to(torch.uint8).cpu().numpy()

"""Permutohedral lattice (Adams, Baek & Davis 2010) in torch: fast high-dimensional Gaussian filtering.

The conventions follow Krähenbühl's C++ lattice that pydensecrf wraps, so a mean-field CRF built on this
class reproduces pydensecrf's marginals:

- features are scaled by sqrt(2/3) (d+1) / sqrt((i+1)(i+2)) on axis i and elevated onto the hyperplane
  sum = 0 of R^(d+1); every point splats onto the d+1 vertices of its enclosing simplex with barycentric
  weights;
- the blur is [0.5, 1, 0.5] along each of the d+1 lattice directions (a missing neighbour counts as 0);
- slicing uses the same barycentric weights, times 1 / (1 + 2^-d); the point's own contribution is kept.

The lattice arithmetic repeats the C++ float32 operations in the same order (including its int truncation
of the plane offset and its double-precision wrap-around of the first barycentric weight), so points that
sit exactly on a simplex boundary (common: the features are integer pixel positions over a width) land in
the same simplex as in pydensecrf.

Everything is vectorised over the points; the only Python loops run over the d+1 lattice directions. The
lattice runs on the device of its ``features`` tensor. Lattice vertices are found by encoding their integer
coordinates in one int64 per vertex, ``torch.unique`` and ``torch.searchsorted``; memory is
O(N (d+1) c) for N points and c value channels.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import Tensor

# Encoded vertex keys must stay below this bound (int64, with headroom for the neighbour offsets).
_MAX_CODE = 2**62


class PermutohedralLattice:
    """Gaussian filter with unit standard deviation in feature space over N points with d features.

    Build once per feature set, then call :meth:`filter` as often as needed (mean-field inference calls
    it twice per iteration). ``filter(v)[i]`` approximates ``sum_j exp(-|f_i - f_j|^2 / 2) v[j]`` as
    pydensecrf's lattice does: up to a smoothly varying factor (about 0.8 in 2-D, 0.5-0.75 in 5-D) that
    normalising by ``filter(1)`` cancels, as the CRF does.

    ``offsets`` (N, d+1): each point's simplex vertices; ``weights`` (N, d+1): its barycentric weights;
    ``blur_neighbours``: per lattice direction, each vertex's (minus, plus) neighbour, -1 where absent.
    """

    def __init__(self, features: Tensor) -> None:
        if not isinstance(features, Tensor) or features.ndim != 2:
            shape = getattr(features, "shape", type(features).__name__)
            raise ValueError(f"lattice features must be a 2-D tensor (N, d), got {shape}")
        n_points, d = features.shape
        if n_points < 1 or d < 1:
            raise ValueError(f"lattice features need at least one point and one dimension, got {tuple(features.shape)}")
        if not torch.isfinite(features).all():
            raise ValueError("lattice features must be finite")
        self.device = features.device
        self.n_points, self.d = n_points, d
        f = features.to(torch.float32)
        dp1 = d + 1

        # Elevate onto the hyperplane (E p, p.5 of Adams et al.), as the C++ code does in float32.
        inv_std = float(np.float32(math.sqrt(2.0 / 3.0) * dp1))
        scale = [float(np.float32(1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std)) for i in range(d)]
        elevated = torch.empty(n_points, dp1, dtype=torch.float32, device=self.device)
        running = torch.zeros(n_points, dtype=torch.float32, device=self.device)
        for j in range(d, 0, -1):
            scaled = f[:, j - 1] * scale[j - 1]
            elevated[:, j] = running - j * scaled
            running = running + scaled
        elevated[:, 0] = running

        # Nearest remainder-0 lattice point by per-coordinate rounding to multiples of d+1 (ties go down).
        down_factor = float(np.float32(1.0) / np.float32(dp1))
        v = elevated * down_factor
        up = torch.ceil(v) * float(dp1)
        down = torch.floor(v) * float(dp1)
        rem0 = torch.where(up - elevated < elevated - down, up, down)
        # The C++ code accumulates the coordinate sum / (d+1) in an int, truncating after every float add.
        plane_sum = torch.zeros(n_points, dtype=torch.float32, device=self.device)
        for i in range(dp1):
            plane_sum = torch.trunc(plane_sum + rem0[:, i] * down_factor)
        rem0_int = rem0.to(torch.int64)

        # Rank of each coordinate of (elevated - rem0) in decreasing order; ties go to the later index.
        residual = elevated - rem0
        rank = torch.zeros(n_points, dp1, dtype=torch.int64, device=self.device)
        for i in range(d):
            for j in range(i + 1, dp1):
                later_is_larger = (residual[:, i] < residual[:, j]).to(torch.int64)
                rank[:, i] += later_is_larger
                rank[:, j] += 1 - later_is_larger
        # A point off the plane (sum != 0) is brought back by rotating the ranks.
        rank += plane_sum.to(torch.int64)[:, None]
        low, high = rank < 0, rank > d
        rank = torch.where(low, rank + dp1, torch.where(high, rank - dp1, rank))
        rem0_int = torch.where(low, rem0_int + dp1, torch.where(high, rem0_int - dp1, rem0_int))
        rem0 = rem0_int.to(torch.float32)

        # Barycentric coordinates (p.10 of Adams et al.).
        bary_step = (elevated - rem0) * down_factor
        bary = torch.zeros(n_points, dp1 + 1, dtype=torch.float32, device=self.device)
        bary.scatter_add_(1, d - rank, bary_step)
        bary.scatter_add_(1, d - rank + 1, -bary_step)
        # The C++ wrap-around adds the double 1.0, so this one sum is rounded once from float64.
        bary[:, 0] = (bary[:, 0].double() + (1.0 + bary[:, dp1].double())).float()
        weights = bary[:, :dp1].contiguous()

        # Vertex r of the simplex is rem0 + canonical[r][rank], canonical[r][k] = r if k <= d - r else r - (d+1).
        # All its coordinates are r mod (d+1), so it is encoded as r + (d+1) * mixed-radix((key - r) / (d+1)),
        # where (key_k - r) / (d+1) = rem0_k / (d+1) - [rank_k > d - r].
        base = torch.div(rem0_int[:, :d], dp1, rounding_mode="floor")
        # Neighbours and vertices reach one unit below and above rem0 / (d+1); one more unit of margin each side.
        m_low = base.min(0).values - 2
        extent = base.max(0).values - m_low + 3
        extent_list = [int(e) for e in extent.tolist()]
        if dp1 * math.prod(extent_list) >= _MAX_CODE:
            raise ValueError(f"lattice features span too wide a range to encode in int64 (extents {extent_list}); "
                             "scale the features down")
        strides = [1] * (d + 1)
        strides[d] = 0                      # the last coordinate is implied by the others (sum 0)
        for i in range(d - 2, -1, -1):
            strides[i] = strides[i + 1] * extent_list[i + 1]
        stride = torch.tensor(strides, dtype=torch.int64, device=self.device)
        base_code = ((base - m_low) * stride[:d]).sum(1)
        # stride_by_rank[:, k] = stride of the coordinate whose rank is k; vertex r drops the ranks d, ..., d-r+1.
        stride_by_rank = torch.zeros(n_points, dp1, dtype=torch.int64, device=self.device)
        stride_by_rank.scatter_(1, rank, stride.expand(n_points, dp1))
        dropped = torch.zeros(n_points, dp1, dtype=torch.int64, device=self.device)
        dropped[:, 1:] = torch.cumsum(stride_by_rank.flip(1), 1)[:, :d]
        codes = torch.arange(dp1, device=self.device)[None, :] + dp1 * (base_code[:, None] - dropped)   # (N, d+1)

        # One sort gives the vertices (unique codes) and each entry's vertex.
        sorted_codes, order = torch.sort(codes.reshape(-1), stable=True)
        vertex_codes, vertex_of_sorted, per_vertex = torch.unique_consecutive(
            sorted_codes, return_inverse=True, return_counts=True)
        self.n_vertices = m = int(vertex_codes.numel())
        self.weights = weights
        self.alpha = 1.0 / (1.0 + 2.0 ** (-d))

        # Blur neighbours along direction j: key - 1 with key_j + d, and key + 1 with key_j - d (j = d: all
        # coordinates move). In code space that is a shift that depends only on the remainder r.
        vertex_remainder = torch.remainder(vertex_codes, dp1)
        total = sum(strides)
        neighbours_by_code = []
        for j in range(dp1):
            others = total - strides[j]
            minus_code = torch.where(vertex_remainder > 0, vertex_codes - 1 + dp1 * strides[j],
                                     vertex_codes + d - dp1 * others)
            neighbours_by_code.append(_lookup(vertex_codes, minus_code))

        # Number the vertices in order of first use by the points, as the C++ hash table does: points are
        # pixels in raster order, so splat, blur and slice then touch the value buffer almost sequentially.
        group_starts = _row_starts(per_vertex)
        first_entry = order[group_starts[:-1]]          # the sort is stable: a group's first entry is its smallest
        by_appearance = torch.argsort(first_entry)      # code-sorted vertex index of vertex 0, 1, ...
        vertex_id = torch.empty_like(by_appearance)
        vertex_id[by_appearance] = torch.arange(m, device=self.device)
        vertex_of_entry = torch.empty_like(vertex_of_sorted)
        vertex_of_entry[order] = vertex_id[vertex_of_sorted]
        self.offsets = vertex_of_entry.reshape(n_points, dp1)      # vertex index (0..M-1) per point and corner

        vertex = torch.arange(m, device=self.device)
        self.blur_neighbours: list[tuple[Tensor, Tensor]] = []   # per direction: (minus, plus) vertex, -1 = none
        for minus_by_code in neighbours_by_code:
            found = minus_by_code >= 0
            minus = torch.where(found, vertex_id[minus_by_code.clamp(min=0)], -1)[by_appearance]
            # "plus" undoes "minus": u = minus(v) exactly when v = plus(u), so one search finds both.
            plus = torch.full((m + 1,), -1, dtype=torch.int64, device=self.device)
            plus.scatter_(0, torch.where(minus >= 0, minus, m), vertex)
            self.blur_neighbours.append((minus, plus[:m]))

        # Sparse CSR operators: slice (N, M), splat (M, N) and one blur (M, M) per direction.
        dev = self.device
        self._slice = _csr(torch.arange(0, n_points * dp1 + 1, dp1, device=dev), self.offsets.reshape(-1),
                           weights.reshape(-1) * self.alpha, (n_points, m))
        # Splat rows are the sorted entries regrouped in vertex-id order.
        count = per_vertex[by_appearance]
        splat_starts = _row_starts(count)
        row_of_slot = torch.repeat_interleave(vertex, count)
        slot = torch.arange(n_points * dp1, device=dev)
        entry = order[group_starts[by_appearance][row_of_slot] + slot - splat_starts[row_of_slot]]
        self._splat = _csr(splat_starts, torch.div(entry, dp1, rounding_mode="floor"), weights.reshape(-1)[entry],
                           (m, n_points))
        self._buffers: dict[int, tuple[Tensor, Tensor]] = {}
        self._blur = []
        for minus, plus in self.blur_neighbours:
            col = torch.stack([minus, vertex, plus], 1).reshape(-1)
            val = torch.tensor([0.5, 1.0, 0.5], device=dev).repeat(m)
            present = col >= 0       # a missing neighbour adds nothing
            per_row = present.reshape(m, 3).sum(1)
            self._blur.append(_csr(_row_starts(per_row), _compact(col, present), _compact(val, present), (m, m)))

    def filter(self, values: Tensor) -> Tensor:
        """Gaussian-filter ``values`` (N, c) (or (N,)); float32 on the lattice's device."""
        if values.shape[0] != self.n_points:
            raise ValueError(f"lattice has {self.n_points} points but values have shape {tuple(values.shape)}")
        vector = values.ndim == 1
        flat = values.reshape(self.n_points, -1).to(device=self.device, dtype=torch.float32)
        channels = flat.shape[1]
        # Two vertex buffers per channel count, reused across calls; addmm(beta=0, out=) writes them in
        # place (a plain sparse @ dense zero-fills a fresh output and copies it: ~30% of the time on CPU).
        if channels not in self._buffers:
            self._buffers[channels] = (torch.empty(self.n_vertices, channels, device=self.device),
                                       torch.empty(self.n_vertices, channels, device=self.device))
        current, spare = self._buffers[channels]
        torch.addmm(current, self._splat, flat, beta=0, out=current)
        for blur in self._blur:
            torch.addmm(spare, blur, current, beta=0, out=spare)
            current, spare = spare, current
        out = torch.empty(self.n_points, channels, device=self.device)
        torch.addmm(out, self._slice, current, beta=0, out=out)
        return out.reshape(-1) if vector else out


def _lookup(vertex_codes: Tensor, codes: Tensor) -> Tensor:
    """Index of each code among the sorted vertex codes, or -1 where the lattice has no such vertex."""
    position = torch.searchsorted(vertex_codes, codes).clamp_(max=vertex_codes.numel() - 1)
    return torch.where(vertex_codes[position] == codes, position, torch.full_like(position, -1))


def _compact(values: Tensor, keep: Tensor) -> Tensor:
    """values[keep] in order, by a scatter (boolean indexing is several times slower on CPU)."""
    target = torch.cumsum(keep, 0) - 1
    total = int(target[-1]) + 1 if target.numel() else 0
    out = torch.empty(total + 1, dtype=values.dtype, device=values.device)
    out.scatter_(0, torch.where(keep, target, total), values)
    return out[:total]


def _row_starts(per_row: Tensor) -> Tensor:
    starts = torch.zeros(per_row.numel() + 1, dtype=torch.int64, device=per_row.device)
    torch.cumsum(per_row, 0, out=starts[1:])
    return starts


def _csr(row_starts: Tensor, col: Tensor, value: Tensor, shape: tuple[int, int]) -> Tensor:
    """CSR matrix from row pointers, column indices (no duplicates within a row) and values."""
    # int32 indices where they fit: the CPU kernels (MKL) take int32 and would convert on every product.
    index_dtype = torch.int32 if max(shape) < 2**31 and col.numel() < 2**31 else torch.int64
    with warnings.catch_warnings():   # "sparse CSR support is in beta": the products used here are stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(row_starts.to(index_dtype), col.to(index_dtype),
                                       value.to(torch.float32).contiguous(), shape, check_invariants=False)

"""A2GNN (Zhang et al., TPAMI 2021, ``zbf1991/A2GNN``): the affinity CNN that turns an image into a graph, and the
per-image affinity-attention GNN trained on it.

Both work on a square window of radius r around every node of the stride-s grid (``(2r + 1)^2`` positions, the
node itself included, row-major over (dy, dx) in [-r, r]^2: the order of ``F.unfold``). A pair is addressed by
its source node and its offset index, so every pairwise quantity is an (N, D) or (B, D, h, w) tensor, never N x N.
The attention's two products (cosines, P H) run per row offset on dense (w x w) row blocks whose band is kept
(:func:`window_dot`, :func:`window_mix`): a few BLAS calls instead of a memory-bound (N, D, C) gather.

- :class:`A2GNNAffinityNet`: AffinityNet's embedding head f (``models.affinity``) scored over the window,
  a_ij = exp(-d_ij), d_ij = mean_c |f_i - f_j|; also gives the node features (the concatenated backbone taps the
  head reads, resized to the affinity grid: ResNet-38's conv4/5/6 = 5,632 channels in the reference).
- :class:`A2GNN`: H0 = Dropout(ReLU(X W_in)), three affinity-attention layers H' = softmax(beta cos(h_i, h_j)
  + 10 A_ij) H restricted to the window (entries with cos < 0 masked), logits Z = H3 W_out; no biases.
- :class:`A2GNNBatch`: B independent A2GNNs on B graphs of one grid size, trained as one: every parameter has a
  leading image dimension, so each kernel is launched once per batch instead of once per image (what pays off
  where launches dominate, e.g. on a GPU; on one CPU thread a demo-size epoch is already BLAS-bound, see
  ``bench/a2gnn.py --batch``). The window maths (:func:`window_dot`, :func:`window_mix`, :func:`window_attention`)
  take any leading batch dimensions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.affinity import AffinityNet, _upsample_to

# The reference's attention mask value and cosine epsilon (pygcn/A2GNN.py).
MASKED = -1e9
COS_EPS = 1e-7


# ------------------------------------------------------------------------------------------------ window


def window_offsets(radius: int) -> list[tuple[int, int]]:
    """The (dy, dx) offsets of the square window, row-major (``F.unfold``'s order); the centre is index D // 2."""
    if radius < 0:
        raise ValueError(f"window radius must be >= 0, got {radius}")
    return [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]


def window_radius_of(num_offsets: int) -> int:
    """r from D = (2r + 1)^2, or a ValueError naming D."""
    side = math.isqrt(num_offsets)
    if side * side != num_offsets or side % 2 == 0:
        raise ValueError(f"a square window has (2r + 1)^2 positions; {num_offsets} is not one")
    return side // 2


def window_valid(height: int, width: int, radius: int, device: torch.device | str | None = None) -> Tensor:
    """Bool (D, h, w): whether the neighbour at each offset lies on the grid."""
    ys = torch.arange(height, device=device)[:, None]
    xs = torch.arange(width, device=device)[None, :]
    masks = [((ys + dy >= 0) & (ys + dy < height) & (xs + dx >= 0) & (xs + dx < width))
             for dy, dx in window_offsets(radius)]
    return torch.stack(masks)


def window_shifts(x: Tensor, radius: int, fill: float = 0.0) -> list[Tensor]:
    """For (..., h, w) maps, the neighbour map at every offset (``fill`` outside the grid; ``F.unfold`` pads 0)."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (radius, radius, radius, radius), value=fill)
    return [padded[..., radius + dy:radius + dy + h, radius + dx:radius + dx + w] for dy, dx in window_offsets(radius)]


def window_distance(features: Tensor, radius: int) -> Tensor:
    """d_ij = mean_c |f_i - f_j| over the window of (B, C, h, w) features -> (B, D, h, w).

    Neighbours outside the grid are compared with zero features (the reference's unfold padding); callers mask
    them with :func:`window_valid`.
    """
    return torch.stack([(features - shifted).abs().mean(1) for shifted in window_shifts(features, radius)], 1)


def block_centres(x: Tensor, grid: tuple[int, int], stride: int) -> Tensor:
    """Nearest-neighbour samples of (..., H, W) at the block centres of the stride-``stride`` grid."""
    height, width = x.shape[-2:]
    rows = torch.clamp(torch.arange(grid[0], device=x.device) * stride + stride // 2, max=height - 1)
    cols = torch.clamp(torch.arange(grid[1], device=x.device) * stride + stride // 2, max=width - 1)
    return x[..., rows[:, None], cols[None, :]]


def rgbxy_kernel(rgb: Tensor, radius: int, sigma_rgb: float, sigma_xy: float) -> Tensor:
    """K_ij = exp(-|(rgb_i - rgb_j) / sigma_rgb|^2 / 2 - |(xy_i - xy_j) / sigma_xy|^2 / 2) over the window of
    (B, 3, h, w) colours (xy in grid cells) -> (B, D, h, w); 0 at the centre and for neighbours off the grid."""
    h, w = rgb.shape[-2:]
    scaled = rgb / sigma_rgb
    colour = torch.stack([((scaled - shifted) ** 2).sum(1) for shifted in window_shifts(scaled, radius)], 1)
    offsets = torch.tensor(window_offsets(radius), dtype=rgb.dtype, device=rgb.device)
    position = ((offsets ** 2).sum(1) / sigma_xy ** 2).reshape(1, -1, 1, 1)
    kernel = torch.exp(-0.5 * (colour + position)) * window_valid(h, w, radius, rgb.device)[None]
    kernel[:, (2 * radius + 1) ** 2 // 2] = 0
    return kernel


@dataclass
class WindowGraph:
    """One image's graph on an (h, w) grid: for node i and offset k, ``index[i, k]`` is the neighbour's node id
    (i itself where the neighbour is off the grid), ``valid[i, k]`` whether it is on the grid, and
    ``affinity[i, k]`` the CNN's a_ij (1 at the centre, 0 off the grid). Nodes are row-major.

    A batch of graphs on one grid (:meth:`stack`) shares ``index`` and ``valid`` (they depend on the grid only)
    and has a (B, N, D) ``affinity``."""

    height: int
    width: int
    radius: int
    index: Tensor      # (N, D) int64
    valid: Tensor      # (N, D) bool
    affinity: Tensor   # (N, D) float; (B, N, D) for a stacked batch

    @property
    def num_nodes(self) -> int:
        return self.height * self.width

    @classmethod
    def from_window_affinity(cls, window_affinity: Tensor) -> WindowGraph:
        """From a (D, h, w) window affinity map (as :meth:`A2GNNAffinityNet.window_outputs` gives it)."""
        if window_affinity.dim() != 3:
            raise ValueError(f"window affinity must be (D, h, w), got shape {tuple(window_affinity.shape)}")
        d, h, w = window_affinity.shape
        radius = window_radius_of(d)
        device = window_affinity.device
        valid = window_valid(h, w, radius, device).reshape(d, -1).T.contiguous()
        node = torch.arange(h * w, device=device)
        steps = torch.tensor([dy * w + dx for dy, dx in window_offsets(radius)], device=device)
        index = torch.where(valid, node[:, None] + steps[None, :], node[:, None])
        affinity = window_affinity.reshape(d, -1).T * valid
        affinity[:, d // 2] = 1.0  # the reference resets the diagonal of A to 1
        return cls(h, w, radius, index, valid, affinity.contiguous())

    @classmethod
    def stack(cls, graphs: list[WindowGraph]) -> WindowGraph:
        """B graphs on one (h, w) grid and window radius as one graph with a (B, N, D) affinity."""
        if not graphs:
            raise ValueError("cannot stack an empty list of window graphs")
        first = graphs[0]
        for graph in graphs[1:]:
            if (graph.height, graph.width, graph.radius) != (first.height, first.width, first.radius):
                raise ValueError(f"stacked window graphs must share grid and radius: {first.height}x{first.width} "
                                 f"r={first.radius} vs {graph.height}x{graph.width} r={graph.radius}")
        return cls(first.height, first.width, first.radius, first.index, first.valid,
                   torch.stack([graph.affinity for graph in graphs]))

    def transposed_affinity(self) -> Tensor:
        """A_ji for each (i, offset k): node j = index[i, k] looks back at i through the opposite offset."""
        if self.affinity.dim() != 2:
            raise ValueError("transposed_affinity works on one graph, not a stacked batch")
        d = self.index.shape[1]
        opposite = self.affinity[self.index, torch.arange(d - 1, -1, -1, device=self.index.device)]
        return opposite * self.valid


def _band_columns(width: int, radius: int, device: torch.device) -> Tensor:
    """(w, 2r + 1): column x + dx of every column x and dx in [-r, r], clamped onto the grid (the clamped
    entries are off the grid and masked by the callers)."""
    columns = torch.arange(width, device=device)[:, None] + torch.arange(-radius, radius + 1, device=device)[None]
    return columns.clamp(0, width - 1)


def _row_spans(height: int, radius: int) -> list[tuple[int, int, int]]:
    """(dy, y0, y1): the rows y in [y0, y1) whose neighbour row y + dy is on the grid, for every dy."""
    return [(dy, max(0, -dy), min(height, height - dy)) for dy in range(-radius, radius + 1)]


def window_dot(h: Tensor, height: int, width: int, radius: int, valid: Tensor | None = None) -> Tensor:
    """h_i . h_j for every node i (row-major on the (h, w) grid) and window offset: (N, D), 0 off the grid.
    ``h`` (..., N, C) with any leading batch dimensions gives (..., N, D).

    Per row offset dy the rows y and y + dy are multiplied as dense (w x C) (C x w) blocks and the band
    |x' - x| <= r is kept: O(N w C) work in a few matrix products and O(N w) memory, never N x N.
    """
    lead, channels = h.shape[:-2], h.shape[-1]
    grid = h.reshape(*lead, height, width, channels)
    columns = _band_columns(width, radius, h.device)
    side = 2 * radius + 1
    parts = []
    for dy, y0, y1 in _row_spans(height, radius):
        if y1 <= y0:
            parts.append(h.new_zeros(*lead, height, width, side))
            continue
        block = torch.matmul(grid[..., y0:y1, :, :], grid[..., y0 + dy:y1 + dy, :, :].transpose(-1, -2))  # (m, w, w)
        band = torch.gather(block, -1, columns.expand(*lead, y1 - y0, width, side))
        parts.append(F.pad(band, (0, 0, 0, 0, y0, height - y1)))
    dots = torch.stack(parts, -2).reshape(*lead, height * width, side * side)
    if valid is None:
        valid = window_valid(height, width, radius, h.device).reshape(side * side, -1).T
    return dots * valid


def window_mix(weights: Tensor, h: Tensor, height: int, width: int, radius: int,
               valid: Tensor | None = None) -> Tensor:
    """sum_k weights[i, k] h[j(i, k)]: the product P H of a window-sparse P given as (N, D) with H (N, C)
    (weights of off-grid neighbours are ignored); same banded blocks as :func:`window_dot`. Leading batch
    dimensions (..., N, D) x (..., N, C) -> (..., N, C) are mapped over."""
    lead, channels = h.shape[:-2], h.shape[-1]
    grid = h.reshape(*lead, height, width, channels)
    columns = _band_columns(width, radius, h.device)
    side = 2 * radius + 1
    if valid is None:
        valid = window_valid(height, width, radius, h.device).reshape(side * side, -1).T
    banded = (weights * valid).reshape(*lead, height, width, side, side)
    out = None
    for row, (dy, y0, y1) in enumerate(_row_spans(height, radius)):
        if y1 <= y0:
            continue
        block = h.new_zeros(*lead, y1 - y0, width, width).scatter_add(
            -1, columns.expand(*lead, y1 - y0, width, side), banded[..., y0:y1, :, row, :])
        part = F.pad(torch.matmul(block, grid[..., y0 + dy:y1 + dy, :, :]), (0, 0, 0, 0, y0, height - y1))
        out = part if out is None else out + part
    return out.reshape(*lead, height * width, channels)


def window_attention(h: Tensor, beta: Tensor, graph: WindowGraph, affinity_weight: float = 10.0) -> Tensor:
    """One affinity-attention layer: e_ij = beta cos(h_i, h_j) + w A_ij over the window, -1e9 where the
    neighbour is off the grid or cos < 0, P = row softmax(e), returns P H (N, C).

    Batched: ``h`` (B, N, C), ``beta`` (B,) and a stacked graph (affinity (B, N, D)) give (B, N, C)."""
    shape = (graph.height, graph.width, graph.radius)
    norms = h.norm(dim=-1)
    cos = window_dot(h, *shape, graph.valid) / (norms[..., :, None] * norms[..., graph.index] + COS_EPS)
    logits = beta[..., None, None] * cos + affinity_weight * graph.affinity
    weights = torch.softmax(logits.masked_fill(~graph.valid | (cos < 0), MASKED), dim=-1)
    return window_mix(weights, h, *shape, graph.valid)


# ------------------------------------------------------------------------------------------- affinity CNN


class A2GNNAffinityNet(AffinityNet):
    """AffinityNet's head scored over a dense square window of radius ``window_radius`` (A2GNN's
    ``resnet38_aff_gated``), with the RGB-XY gated penalty's settings carried for the training loss."""

    window_graph = True   # scored over a window, not pairs: its training and inference live in stages.affinity.a2gnn

    def __init__(self, backbone: nn.Module, window_radius: int = 3, gated_weight: float = 3.0,
                 gated_sigma_rgb: float = 0.1, gated_sigma_xy: float = 6.0, freeze_backbone: bool = False,
                 freeze_bn: bool = True, frozen_early: bool = False):
        super().__init__(backbone, freeze_backbone=freeze_backbone, freeze_bn=freeze_bn, frozen_early=frozen_early)
        if window_radius < 1:
            raise ValueError(f"A2GNN window radius must be >= 1, got {window_radius}")
        self.window_radius = window_radius
        self.gated_weight = gated_weight
        self.gated_sigma_rgb = gated_sigma_rgb
        self.gated_sigma_xy = gated_sigma_xy
        self.node_channels = sum(list(backbone.tap_channels)[-3:])

    def _taps(self, x: Tensor) -> list[Tensor]:
        if self.freeze_backbone:
            with torch.no_grad():
                return self.backbone.taps(x)[-3:]
        return self.backbone.taps(x)[-3:]

    def _embed(self, taps: list[Tensor]) -> Tensor:
        size = taps[0].shape[-2:]
        levels = [F.elu(_upsample_to(conv(t), size)) for conv, t in zip(self.reduce, taps)]
        return F.elu(self.fuse(torch.cat(levels, 1)))

    def forward(self, x: Tensor) -> Tensor:
        return self._embed(self._taps(x))

    def window_outputs(self, x: Tensor, node_features: bool = False) -> dict[str, Tensor]:
        """{"features": f (B, 448, h, w), "distance": d (B, D, h, w), "affinity": exp(-d)} and, with
        ``node_features``, {"node_features": the three taps concatenated at the grid size (B, F, h, w)}."""
        taps = self._taps(x)
        features = self._embed(taps)
        distance = window_distance(features, self.window_radius)
        out = {"features": features, "distance": distance, "affinity": torch.exp(-distance)}
        if node_features:
            size = features.shape[-2:]
            out["node_features"] = torch.cat([_upsample_to(t, size) for t in taps], 1)
        return out


# ---------------------------------------------------------------------------------------------------- GNN


class A2GNN(nn.Module):
    """The per-image GNN: ``forward(x, graph)`` -> (logits Z (N, C), embedding H3 (N, hidden)).

    ``x`` are the node features, already L1-normalised per row. Initial weights (W_in Xavier, one beta ~ U(0, 1)
    per layer, W_out Xavier, in the reference's order) and dropout masks come from ``generator`` when given, so
    a seeded generator makes a run reproducible independently of the global RNG.
    """

    def __init__(self, in_features: int, num_classes: int, hidden: int = 256, layers: int = 3, dropout: float = 0.5,
                 affinity_weight: float = 10.0, generator: torch.Generator | None = None):
        super().__init__()
        if in_features < 1 or num_classes < 1 or hidden < 1 or layers < 1:
            raise ValueError(f"A2GNN needs positive sizes, got in_features={in_features}, num_classes={num_classes}, "
                             f"hidden={hidden}, layers={layers}")
        if not 0 <= dropout < 1:
            raise ValueError(f"A2GNN dropout must lie in [0, 1), got {dropout}")
        self.dropout = dropout
        self.affinity_weight = affinity_weight
        self.generator = generator
        # Parameters start on the generator's device: a CUDA generator cannot fill CPU tensors.
        dev = generator.device if generator is not None else None
        self.w_in = nn.Parameter(nn.init.xavier_uniform_(torch.empty(in_features, hidden, device=dev),
                                                         generator=generator))
        self.betas = nn.Parameter(torch.rand(layers, generator=generator, device=dev))
        self.w_out = nn.Parameter(nn.init.xavier_uniform_(torch.empty(hidden, num_classes, device=dev),
                                                          generator=generator))

    def forward(self, x: Tensor, graph: WindowGraph) -> tuple[Tensor, Tensor]:
        h = torch.relu(x @ self.w_in)
        if self.training and self.dropout > 0:
            draw = torch.rand(h.shape, generator=self.generator, device=h.device) if self.generator is not None \
                else torch.rand(h.shape, device=h.device)
            h = h * (draw >= self.dropout).to(h.dtype) / (1 - self.dropout)
        for beta in self.betas:
            h = window_attention(h, beta, graph, self.affinity_weight)
        return h @ self.w_out, h


class A2GNNBatch(nn.Module):
    """B independent :class:`A2GNN` s on B graphs of one grid, as one module: ``forward(x (B, N, F), graph)``
    with a stacked graph (:meth:`WindowGraph.stack`) -> (logits (B, N, C_max), embeddings (B, N, hidden)).

    Image b starts from exactly the weights ``A2GNN(..., generators[b])`` would draw and takes its dropout masks
    from ``generators[b]`` in the same order, so with a loss that is a sum of per-image losses (each image's
    gradients are its own) and an elementwise optimiser (Adam) every image trains as it would alone, up to float
    summation order. Images with fewer classes than ``C_max = max(class_counts)`` get zero W_out columns and
    logits of -1e9 there: softmax and cross-entropy give those classes exactly 0 and they receive no gradient.
    """

    def __init__(self, in_features: int, class_counts: list[int], hidden: int = 256, layers: int = 3,
                 dropout: float = 0.5, affinity_weight: float = 10.0,
                 generators: list[torch.Generator] | None = None):
        super().__init__()
        if not class_counts:
            raise ValueError("A2GNNBatch needs at least one image")
        if generators is not None and len(generators) != len(class_counts):
            raise ValueError(f"A2GNNBatch: {len(generators)} generators for {len(class_counts)} images")
        generators = generators if generators is not None else [None] * len(class_counts)
        singles = [A2GNN(in_features, classes, hidden, layers, dropout, affinity_weight, generator=generator)
                   for classes, generator in zip(class_counts, generators)]
        widest = max(class_counts)
        self.dropout = dropout
        self.affinity_weight = affinity_weight
        self.generators = generators
        self.class_counts = list(class_counts)
        self.w_in = nn.Parameter(torch.stack([single.w_in.detach() for single in singles]))
        self.betas = nn.Parameter(torch.stack([single.betas.detach() for single in singles]))
        self.w_out = nn.Parameter(torch.stack([F.pad(single.w_out.detach(), (0, widest - single.w_out.shape[1]))
                                               for single in singles]))
        counts = torch.tensor(class_counts, device=self.w_out.device)
        self.register_buffer("class_valid", torch.arange(widest, device=counts.device)[None] < counts[:, None],
                             persistent=False)

    def forward(self, x: Tensor, graph: WindowGraph) -> tuple[Tensor, Tensor]:
        h = torch.relu(torch.matmul(x, self.w_in))
        if self.training and self.dropout > 0:
            shape = h.shape[1:]
            draws = torch.stack([torch.rand(shape, generator=generator, device=h.device) if generator is not None
                                 else torch.rand(shape, device=h.device) for generator in self.generators])
            h = h * (draws >= self.dropout).to(h.dtype) / (1 - self.dropout)
        for beta in self.betas.unbind(1):
            h = window_attention(h, beta, graph, self.affinity_weight)
        logits = torch.matmul(h, self.w_out).masked_fill(~self.class_valid[:, None, :], MASKED)
        return logits, h

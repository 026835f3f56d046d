"""DDD: a grid CRF layer solved by differentiable dual decomposition (Wang et al., arXiv 1912.02937).

The CRF maximises S(x) = sum_i theta_i(x_i) + sum_{d=1..K} sum_{(i,j) in E_d} theta_ij(x_i, x_j) over labelings of an
H x W grid, where E_d holds the horizontal and vertical pairs d pixels apart and every theta_ij is a full C x C table
(index [label of the left/top pixel, label of the right/bottom pixel]; any sign, not symmetric). The layer
(:class:`DDDLayer`) predicts both from features f: theta_i by a 1x1 conv, theta_ij by one 1x1 conv on [f_i; f_j].

**Decomposition.** At distance d every row of the grid splits into d interleaved horizontal chains (pixels
x = j, j + d, ...) and every column into d vertical ones, so each pixel lies in T = 2K chains, one per *copy*
t = (d, orientation), and each edge in exactly one. Copy t holds a unary u^t with sum_t u^t = theta (start:
theta / T). Its chains are solved exactly by a log-semiring forward/backward at temperature gamma:
F_1 = u_1, F_{s+1}(b) = u_{s+1}(b) + smax_a[F_s(a) + theta_s(a, b)] and B likewise from the other end, with
smax(z) = gamma log sum exp(z / gamma) (gamma = 0: max, Viterbi); the smoothed max-marginals are m = F + B - u and
a chain's value Phi_c = smax_s m_i(s) at any node i. The dual D(u) = sum_c Phi_c bounds max_x S(x) from above.
One iteration moves every copy towards the copies' mean: u^t <- u^t - alpha (m^t - mean_t m^t), which keeps
sum_t u^t = theta and, for alpha <= 1 / (longest chain), never raises D (the default alpha = 1/max(H, W)).

**The reference** (taconite/DDD-Differentiable-Dual-Decomposition @ 9928751, ``FixedPointIterationGapN`` and
``seg_aspp_resnet.forward``): 5 DP passes at gamma = 2 with an update after each; a pass whose dual rose by
>= 1e-4 stops the loop and the previous pass is kept; the logits are sum_t m^t of the kept pass, with autograd
through every pass. This module computes the same numbers with these differences, none of which changes a value:
- The reference cuts each stride-d *phase grid* x[i::d, j::d] into rows and columns and scatters its marginals back
  with max_unpool; here the chains are read straight from the full grid by index (a row of phase grid (i, j) is
  row y = i + d k, pixels j, j + d, ...), so one DP call serves every chain of one length of every copy.
- The pairwise conv on [f_i; f_j] is computed as W_left f + W_right f shifted by d, which is the same linear map
  applied once per pixel instead of once per pair and per distance.
- The dual and the early stop are per image (the reference sums the dual over the batch and stops the batch);
  at batch 1, how the reference evaluates, they coincide, and an image's output never depends on its batch.
- The CUDA kernel hard-codes C = 21 and saves four B x C x C x H x W soft-argmax tensors per pass;
  :class:`ChainMarginals` stores only F and B and recomputes each edge's C x C weights in backward, for any C.

**Complexity.** A pass costs O(B T H W C^2) exps in sum over (number of distinct chain lengths, at most 2 per
distance and orientation) DP calls of max(H, W) sequential steps each, every step a batched (chains, C, C) op. The
pairwise tables take O(B K H W C^2) memory once; each pass adds O(B T H W C) (F, B, m, u), so backward through I
passes keeps O(I B T H W C) where plain autograd through the DP would keep O(I B T H W C^2).

**Gradients** are those of the smoothed DP, exact: dm_s(a)/du_r(b) = P_gamma(x_r = b | x_s = a) for r != s; at
gamma = 0 the conditional arg-max path (a subgradient). The early-stop test runs under ``no_grad``.

:func:`map_inference` is the analysis mode: hard max, many iterations, the best dual bound, the decoded score and
the optimality certificate (every copy's argmax agrees, so the decoded labeling attains the dual).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Pairwise tables, one entry per distance d = 1..K: (horizontal (B, C, C, H, W - d), vertical (B, C, C, H - d, W)).
GridPairs = list[tuple[Tensor, Tensor]]


def smax(x: Tensor, gamma: float, dim: int) -> Tensor:
    """gamma * logsumexp(x / gamma) along ``dim``; the max at gamma = 0."""
    if gamma == 0:
        return x.amax(dim)
    return gamma * torch.logsumexp(x / gamma, dim)


def _soft_argmax(x: Tensor, value: Tensor, gamma: float, dim: int) -> Tensor:
    """The derivative of :func:`smax` w.r.t. ``x`` given its ``value`` = smax(x, dim): exp((x - value) / gamma), the
    softmax without a second reduction; the one-hot arg-max at gamma = 0."""
    if gamma == 0:
        return F.one_hot(x.argmax(dim), x.shape[dim]).to(x.dtype).movedim(-1, dim)
    return ((x - value.unsqueeze(dim)) / gamma).exp_()


# ----------------------------------------------------------------------------------------------- chain DP

def chain_messages(unary: Tensor, pair: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """Forward and backward messages of N chains at once: unary (L, N, C), pair (L - 1, N, C, C) -> F, B (L, N, C).

    Plain tensor ops: autograd through it saves a (N, C, C) tensor per step (the bench's baseline)."""
    length = unary.shape[0]
    fwd, bwd = [unary[0]], [unary[-1]]
    for s in range(length - 1):
        fwd.append(unary[s + 1] + smax(fwd[-1][:, :, None] + pair[s], gamma, 1))
        r = length - 2 - s
        bwd.append(unary[r] + smax(bwd[-1][:, None, :] + pair[r], gamma, 2))
    return torch.stack(fwd), torch.stack(bwd[::-1])


def chain_marginals_autograd(unary: Tensor, pair: Tensor, gamma: float) -> Tensor:
    """Smoothed max-marginals m = F + B - u (L, N, C), differentiated by autograd through every step."""
    fwd, bwd = chain_messages(unary, pair, gamma)
    return fwd + bwd - unary


class ChainMarginals(torch.autograd.Function):
    """The same max-marginals as :func:`chain_marginals_autograd`, storing only u, F and B: backward recomputes each
    edge's (N, C, C) soft-argmax weights from them, so its memory is O(L N C) beyond the pairwise input.

    Backward: with g = dL/dm, the adjoint of F runs right to left, Fbar_L = g_L,
    Fbar_s(a) = g_s(a) + sum_b w_s(a | b) Fbar_{s+1}(b), w_s(. | b) = soft-argmax_a[F_s(a) + theta_s(a, b)]; the
    adjoint of B runs left to right likewise; du = Fbar + Bbar - g and dtheta_s(a, b) collects both directions.
    The smax values the weights need are F_{s+1} - u_{s+1} and B_s - u_s, so no reduction is recomputed."""

    @staticmethod
    def forward(ctx, unary: Tensor, pair: Tensor, gamma: float) -> Tensor:
        fwd, bwd = chain_messages(unary, pair, gamma)
        ctx.save_for_backward(unary, pair, fwd, bwd)
        ctx.gamma = gamma
        return fwd + bwd - unary

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        unary, pair, fwd, bwd = ctx.saved_tensors
        gamma, length = ctx.gamma, unary.shape[0]
        grad_pair = torch.empty_like(pair)
        fwd_adj, bwd_adj = torch.empty_like(unary), torch.empty_like(unary)
        fwd_adj[-1] = grad[-1]
        for s in range(length - 2, -1, -1):
            weight = _soft_argmax(fwd[s][:, :, None] + pair[s], fwd[s + 1] - unary[s + 1], gamma, 1)
            part = weight * fwd_adj[s + 1][:, None, :]
            grad_pair[s] = part
            fwd_adj[s] = grad[s] + part.sum(2)
        bwd_adj[0] = grad[0]
        for s in range(length - 1):
            weight = _soft_argmax(bwd[s + 1][:, None, :] + pair[s], bwd[s] - unary[s], gamma, 2)
            part = weight * bwd_adj[s][:, :, None]
            grad_pair[s] += part
            bwd_adj[s + 1] = grad[s + 1] + part.sum(1)
        return fwd_adj + bwd_adj - grad, grad_pair, None


def chain_marginals(unary: Tensor, pair: Tensor, gamma: float, backend: str = "function") -> Tensor:
    """Max-marginals of N chains of length L: unary (L, N, C), pair (L - 1, N, C, C) -> (L, N, C).

    ``backend``: ``function`` (:class:`ChainMarginals`, recompute in backward) or ``autograd`` (plain ops)."""
    if gamma < 0:
        raise ValueError(f"DDD gamma must be >= 0 (0 = hard max), got {gamma}")
    if backend == "function":
        return ChainMarginals.apply(unary, pair, gamma)
    if backend == "autograd":
        return chain_marginals_autograd(unary, pair, gamma)
    raise ValueError(f"DDD backend must be 'function' or 'autograd', got {backend!r}")


# ------------------------------------------------------------------------------------------- grid layout

@dataclass(frozen=True)
class ChainGroup:
    """Every chain of one length, of every copy: ``nodes`` (L, N) index copy-pixel slots t * H * W + y * W + x;
    ``edges`` (L - 1, N) index the concatenated edge list (see :func:`flat_pairs`)."""

    nodes: Tensor
    edges: Tensor


@dataclass(frozen=True)
class ChainLayout:
    height: int
    width: int
    distances: int
    groups: tuple[ChainGroup, ...]
    order: Tensor  # the slot permutation that puts the concatenated group outputs back in slot order

    @property
    def copies(self) -> int:
        return 2 * self.distances

    def to(self, device: torch.device) -> ChainLayout:
        groups = tuple(ChainGroup(g.nodes.to(device), g.edges.to(device)) for g in self.groups)
        return ChainLayout(self.height, self.width, self.distances, groups, self.order.to(device))


def _copy_chains(h: int, w: int, d: int, vertical: bool, slot0: int, edge0: int
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """The chains of copy (d, orientation) as (nodes (N, L), edges (N, L - 1)) arrays, one entry per phase."""
    if vertical:  # a column chain of the grid is a row chain of its transpose
        pixel = np.arange(h * w).reshape(h, w).T
        edge = np.arange((h - d) * w).reshape(max(h - d, 0), w).T
        rows, cols = w, h
    else:
        pixel = np.arange(h * w).reshape(h, w)
        edge = np.arange(h * max(w - d, 0)).reshape(h, max(w - d, 0))
        rows, cols = h, w
    chains = []
    for phase in range(min(d, cols)):
        steps = np.arange(phase, cols, d)
        nodes = slot0 + pixel[:, steps].reshape(rows, -1)
        edges = edge0 + edge[:, steps[:-1]].reshape(rows, -1)
        chains.append((nodes, edges))
    return chains


@functools.lru_cache(maxsize=64)
def chain_layout(height: int, width: int, distances: int) -> ChainLayout:
    """Every chain of the H x W grid at distances 1..K, grouped by length (on the CPU; cached)."""
    by_length: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    hw, edge0 = height * width, 0
    for d in range(1, distances + 1):
        for vertical in (False, True):
            slot0 = (2 * (d - 1) + vertical) * hw
            for nodes, edges in _copy_chains(height, width, d, vertical, slot0, edge0):
                by_length.setdefault(nodes.shape[1], []).append((nodes, edges))
            edge0 += (height - d) * width if vertical else height * max(width - d, 0)
    groups = []
    for length in sorted(by_length, reverse=True):
        nodes = np.concatenate([n for n, _ in by_length[length]])
        edges = np.concatenate([e for _, e in by_length[length]]).reshape(len(nodes), length - 1)
        groups.append(ChainGroup(torch.from_numpy(nodes.T.copy()), torch.from_numpy(edges.T.copy())))
    slots = torch.cat([g.nodes.reshape(-1) for g in groups])
    return ChainLayout(height, width, distances, tuple(groups), torch.argsort(slots))


def flat_pairs(pairs: GridPairs) -> Tensor:
    """Every edge's table in one (E, B, C, C) tensor: per distance, horizontal edges row-major, then vertical."""
    parts = [table.permute(3, 4, 0, 1, 2).reshape(-1, *table.shape[:3]) for hv in pairs for table in hv]
    return torch.cat(parts)


# ------------------------------------------------------------------------------------------- validation

def check_potentials(unary: Tensor, pairs: GridPairs) -> None:
    """A clear error for potentials the layer cannot take: shapes, class count, an empty grid, NaN or inf."""
    if unary.dim() != 4:
        raise ValueError(f"DDD unary must be (B, C, H, W), got shape {tuple(unary.shape)}")
    b, c, h, w = unary.shape
    if c < 2:
        raise ValueError(f"DDD needs at least 2 classes, got C = {c}")
    if b < 1 or h < 1 or w < 1:
        raise ValueError(f"DDD needs a non-empty batch and grid, got (B, C, H, W) = {tuple(unary.shape)}")
    if not pairs:
        raise ValueError("DDD needs pairwise tables for at least one distance")
    for d, (horizontal, vertical) in enumerate(pairs, start=1):
        want = ((b, c, c, h, max(w - d, 0)), (b, c, c, max(h - d, 0), w))
        if (tuple(horizontal.shape), tuple(vertical.shape)) != want:
            raise ValueError(f"DDD pairwise tables at distance {d} must be horizontal {want[0]} and vertical "
                             f"{want[1]}, got {tuple(horizontal.shape)} and {tuple(vertical.shape)}")
    for name, x in [("unary", unary)] + [(f"pairwise (distance {d})", t) for d, hv in enumerate(pairs, 1)
                                          for t in hv]:
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"DDD {name} potentials contain NaN or inf")


# ----------------------------------------------------------------------------------------- dual decomposition

class GridDecomposition:
    """The chains of one set of potentials, ready for passes: ``marginals(copies)`` solves every chain of every copy.

    Copy unaries are kept as (T, H * W, B, C) so that a group of chains is one gather and the update is one op."""

    def __init__(self, unary: Tensor, pairs: GridPairs, gamma: float = 2.0, backend: str = "function"):
        check_potentials(unary, pairs)
        if gamma < 0:
            raise ValueError(f"DDD gamma must be >= 0 (0 = hard max), got {gamma}")
        self.batch, self.classes, self.height, self.width = unary.shape
        self.gamma, self.backend = float(gamma), backend
        self.layout = chain_layout(self.height, self.width, len(pairs)).to(unary.device)
        edges = flat_pairs(pairs)
        self.group_pairs = [edges[g.edges.reshape(-1)].reshape(g.edges.shape[0], g.edges.shape[1] * self.batch,
                                                                 self.classes, self.classes)
                            for g in self.layout.groups]
        self.unary = unary

    def initial_copies(self) -> Tensor:
        """u^t = theta / T for every copy t: (T, H * W, B, C)."""
        t = self.layout.copies
        slots = self.unary.flatten(2).permute(2, 0, 1) / t
        return slots.expand(t, *slots.shape)

    def marginals(self, copies: Tensor) -> tuple[Tensor, Tensor]:
        """Every copy's max-marginals (T, H * W, B, C) and the dual D (B,) of ``copies`` (T, H * W, B, C)."""
        slots = copies.reshape(-1, self.batch, self.classes)
        outputs, dual = [], copies.new_zeros(self.batch)
        for group, pair in zip(self.layout.groups, self.group_pairs):
            length, n = group.nodes.shape
            unary = slots[group.nodes.reshape(-1)].reshape(length, n * self.batch, self.classes)
            m = chain_marginals(unary, pair, self.gamma, self.backend)
            with torch.no_grad():
                dual += smax(m[0], self.gamma, 1).reshape(n, self.batch).sum(0)
            outputs.append(m.reshape(length * n, self.batch, self.classes))
        return torch.cat(outputs)[self.layout.order].reshape(copies.shape), dual

    def update(self, copies: Tensor, marginals: Tensor, alpha: float) -> Tensor:
        """Damped max-marginal averaging u^t - alpha (m^t - mean_t m^t); sum_t u^t stays theta."""
        return copies - alpha * (marginals - marginals.mean(0))

    def to_grid(self, slots: Tensor) -> Tensor:
        """(H * W, B, C) -> (B, C, H, W)."""
        return slots.permute(1, 2, 0).reshape(self.batch, self.classes, self.height, self.width)

    def default_alpha(self) -> float:
        return 1.0 / max(self.height, self.width)


def dual_decomposition(unary: Tensor, pairs: GridPairs, gamma: float = 2.0, iterations: int = 5,
                       alpha: float = 0.0, early_stop: float | None = 1e-4, backend: str = "function") -> Tensor:
    """DDD's output logits sum_t m^t (B, C, H, W) after ``iterations`` DP passes (the reference's forward).

    ``alpha`` 0 means 1 / max(H, W); ``early_stop``: an image whose dual rises by at least this much keeps its
    previous pass (None: never stop)."""
    if iterations < 1:
        raise ValueError(f"DDD iterations must be >= 1, got {iterations}")
    if alpha < 0:
        raise ValueError(f"DDD alpha must be > 0 (0 = 1 / max(H, W)), got {alpha}")
    grid = GridDecomposition(unary, pairs, gamma, backend)
    alpha = alpha or grid.default_alpha()
    copies = grid.initial_copies()
    marginals, dual = grid.marginals(copies)
    output = marginals.sum(0)
    stopped = torch.zeros(grid.batch, dtype=torch.bool, device=unary.device)
    for _ in range(iterations - 1):
        copies = grid.update(copies, marginals, alpha)
        marginals, new_dual = grid.marginals(copies)
        if early_stop is not None:
            stopped = stopped | (new_dual - dual >= early_stop)  # not in place: where() saved it
            if bool(stopped.all()):
                break
        output = torch.where(stopped[None, :, None], output, marginals.sum(0))
        dual = new_dual
    return grid.to_grid(output)


# -------------------------------------------------------------------------------------------------- MAP mode

def grid_score(labels: Tensor, unary: Tensor, pairs: GridPairs) -> Tensor:
    """S(x) (B,) of labelings ``labels`` (B, H, W)."""
    score = unary.gather(1, labels[:, None]).flatten(1).sum(1)
    for d, (horizontal, vertical) in enumerate(pairs, start=1):
        c = unary.shape[1]
        left, right = labels[:, :, :-d], labels[:, :, d:]
        score = score + horizontal.flatten(1, 2).gather(1, (left * c + right)[:, None]).flatten(1).sum(1)
        top, bottom = labels[:, :-d], labels[:, d:]
        score = score + vertical.flatten(1, 2).gather(1, (top * c + bottom)[:, None]).flatten(1).sum(1)
    return score


@dataclass(frozen=True)
class MapResult:
    labels: Tensor     # (B, H, W): the best decoded labeling seen
    score: Tensor      # (B,): its S(x)
    dual: Tensor       # (B,): the lowest hard dual seen, an upper bound on max_x S(x)
    certified: Tensor  # (B,) bool: every copy's argmax agreed at some pass, so ``labels`` is a MAP labeling
    iterations: int    # passes run

    @property
    def gap(self) -> Tensor:
        return self.dual - self.score


def map_inference(unary: Tensor, pairs: GridPairs, iterations: int = 300, alpha: float = 0.0,
                  gamma: float = 0.0) -> MapResult:
    """Hard dual decomposition for analysis: decode argmax_s sum_t m^t at every pass and keep the best labeling,
    the lowest dual, and whether all copies' arg-maxes agreed (then D_0 = S(x) and x is optimal). Stops early once
    every image is certified. No gradients."""
    with torch.no_grad():
        grid = GridDecomposition(unary, pairs, gamma, "function")
        alpha = alpha or grid.default_alpha()
        copies = grid.initial_copies()
        best = _MapTracker(grid.batch, unary.device, unary.dtype)
        passes = 0
        while passes < iterations:
            marginals, dual = grid.marginals(copies)
            passes += 1
            best.observe(grid, marginals, dual, unary, pairs)
            if bool(best.certified.all()):
                break
            copies = grid.update(copies, marginals, alpha)
        return MapResult(best.labels, best.score, best.dual, best.certified, passes)


class _MapTracker:
    def __init__(self, batch: int, device: torch.device, dtype: torch.dtype):
        self.labels: Tensor | None = None
        self.score = torch.full((batch,), -torch.inf, device=device, dtype=dtype)
        self.dual = torch.full((batch,), torch.inf, device=device, dtype=dtype)
        self.certified = torch.zeros(batch, dtype=torch.bool, device=device)

    def observe(self, grid: GridDecomposition, marginals: Tensor, dual: Tensor, unary: Tensor, pairs: GridPairs
                ) -> None:
        labels = grid.to_grid(marginals.sum(0)).argmax(1)
        score = grid_score(labels, unary, pairs)
        copy_labels = marginals.argmax(-1)  # (T, H * W, B)
        agree = (copy_labels == copy_labels[:1]).flatten(0, 1).all(0)
        better = score > self.score
        self.labels = labels if self.labels is None else torch.where(better[:, None, None], labels, self.labels)
        self.score = torch.maximum(score, self.score)
        self.dual = torch.minimum(dual, self.dual)
        self.certified |= agree & (grid.gamma == 0)


# ----------------------------------------------------------------------------------------------------- layer

class PairwiseHead(nn.Module):
    """theta_ij = one 1x1 conv on [f_i; f_j] (2D -> C^2) for every horizontal and vertical pair at distances 1..K,
    initialised N(0, 1e-3) with zero bias so the CRF starts almost flat (reference)."""

    def __init__(self, in_channels: int, num_classes: int, distances: int = 2):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"DDD needs at least 2 classes, got num_classes = {num_classes}")
        if distances < 1:
            raise ValueError(f"DDD distances must be >= 1, got {distances}")
        self.num_classes, self.distances = num_classes, distances
        self.conv = nn.Conv2d(2 * in_channels, num_classes * num_classes, 1)
        nn.init.normal_(self.conv.weight, 0.0, 1e-3)
        nn.init.zeros_(self.conv.bias)

    def forward(self, features: Tensor) -> GridPairs:
        """conv([f_i; f_j]) = W_first f_i + W_second f_j + b, evaluated as two per-pixel maps added at every offset."""
        b, dim, h, w = features.shape
        c, weight = self.num_classes, self.conv.weight
        first = F.conv2d(features, weight[:, :dim], self.conv.bias).reshape(b, c, c, h, w)
        second = F.conv2d(features, weight[:, dim:]).reshape(b, c, c, h, w)
        return [(first[..., :, :-d] + second[..., :, d:], first[..., :-d, :] + second[..., d:, :])
                for d in range(1, self.distances + 1)]


@dataclass(frozen=True)
class DDDOptions:
    """The solver's knobs (the reference's values are the defaults); ``early_stop`` None never stops early."""

    iterations: int = 5
    gamma: float = 2.0
    distances: int = 2
    alpha: float = 0.0            # 0 = 1 / max(H, W)
    early_stop: float | None = 1e-4
    backend: str = "function"     # function (recompute in backward) | autograd


class DDDLayer(nn.Module):
    """Learned unary and pairwise potentials from features (B, D, H, W) and DDD's logits (B, C, H, W) on that grid.

    Unary: 1x1 conv D -> C, initialised N(0, 1e-3) with zero bias (reference); pairwise: :class:`PairwiseHead`."""

    def __init__(self, in_channels: int, num_classes: int, options: DDDOptions = DDDOptions()):
        super().__init__()
        self.options = options
        self.pairwise = PairwiseHead(in_channels, num_classes, options.distances)
        self.unary = nn.Conv2d(in_channels, num_classes, 1)
        nn.init.normal_(self.unary.weight, 0.0, 1e-3)
        nn.init.zeros_(self.unary.bias)

    def potentials(self, features: Tensor) -> tuple[Tensor, GridPairs]:
        return self.unary(features), self.pairwise(features)

    def forward(self, features: Tensor) -> Tensor:
        return solve(*self.potentials(features), self.options)


def solve(unary: Tensor, pairs: GridPairs, options: DDDOptions) -> Tensor:
    """:func:`dual_decomposition` with ``options``."""
    return dual_decomposition(unary, pairs, options.gamma, options.iterations, options.alpha, options.early_stop,
                              options.backend)

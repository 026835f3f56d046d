"""A2GNN propagation (Zhang et al., TPAMI 2021, ``zbf1991/A2GNN``): a fresh affinity-attention GNN per image.

Two parts, both on the affinity net's stride-s grid (s = 8 for ResNet-38; ``resnet_mini`` taps are at 8 too):

1. **Affinity CNN** (``TrainAffinity.affinity_method = a2gnn``; :func:`affinity_loss`, :func:`infer_window_graph`):
   AffinityNet's embedding head scored over a dense square window of radius r (3 for image/point supervision,
   4 for box/scribble: ``TrainAffinity.window_radius``), a_ij = exp(-d_ij), d_ij = mean_c |f_i - f_j|. Pair labels
   over the window from the seed map at the net's stride (positive = same label, 255 ignored); loss
   1/4 bg+ + 1/4 fg+ + 1/2 neg + 3 x L_gated, L_gated = sum K_ij d_ij m_ij / sum m_ij with the RGB-XY kernel
   K_ij = exp(-|(rgb_i - rgb_j) / 0.1|^2 / 2 - |(xy_i - xy_j) / 6|^2 / 2) (K_ii = 0; rgb = the normalised input
   bilinearly resized to the grid, xy in grid cells) and m_ij = both pixels inside the image (not crop padding).
2. **Per-image GNN** (:func:`propagate_a2gnn`): node features = the concatenated backbone taps, L1-normalised;
   :class:`models.a2gnn.A2GNN` (256 hidden, dropout 0.5, three attention layers) trained with Adam (wd 5e-4) on
   the seeds with the balanced loss CE(bg seeds) + CE(fg seeds). As the reference, the seed, multi-point and
   consistency losses read the logits and embeddings upsampled bilinearly onto the padded image, every labelled
   pixel counting (``Propagate.a2gnn_loss_resolution = image``; :class:`LossPixels` gathers the upsampled values
   at the labelled pixels only, from their four nodes, instead of forming the upsampled maps: the same values
   at a cost linear in the labelled pixels). ``grid`` runs them on the nodes, the seeds sampled at block
   centres: seeds smaller than a block can be missed and each node weighs one seed pixel instead of its block's
   labelled pixels, so the labels differ (measured in the README):

   ============== ===== ============================== ===================================================
   supervision     lr    epochs (seed, + Gated CRF)     losses
   ============== ===== ============================== ===================================================
   image, point   0.03  50, 50                         seed; then seed + 0.3 GCRF; random-walk fusion at the end
   scribble       0.03  50, 50                         seed; then seed + 0.3 GCRF
   box            0.035 150, 150                       seed + MP; then seed + 0.01 GCRF + MP
   ============== ===== ============================== ===================================================

   GCRF = Gated-CRF Potts loss on softmax(Z) at grid resolution, as the reference's (radius 5, sigma_xy 6 cells,
   sigma_rgb 0.1 on the normalised image): sum K_ij (1 - <y_i, y_j>) / (h w). MP (box only,
   :func:`multi_point_loss`): per box of class c, the pixel (node, for ``grid``) of highest class-c logit in every
   row and every column; CE against c over all points / their count, plus sum (1 - cos) over all ordered point
   pairs / their count; the consistency check then sets to ignore every seed in the box labelled c whose
   embedding has cosine < 0 to the points' mean embedding (cumulative, every epoch, before that epoch's seed loss,
   as the reference).
   Inference: dropout off, logits upsampled bilinearly (x s, then cropped to the image), softmax. Image/point
   supervision adds the random walk: T = column-normalised A^8 of the window affinities, CAM vector
   [(1 - max)^6; CAMs] average-pooled s x s, walked 2^6 = 64 steps (:func:`window_random_walk`: one window
   gather per step, never N x N), upsampled; p = softmax + 3 rw, renormalised per pixel. Last, the dense CRF
   (``Propagate.a2gnn_crf_preset``, A2GNN's ``a2gnn_final`` by default) gives the returned marginals.
3. **Many images at once** (:func:`propagate_a2gnn_many`): images of one grid size and supervision train as one
   batch (:class:`models.a2gnn.A2GNNBatch`, :func:`train_a2gnn_batch`), one kernel launch per batch instead of per
   image: the loss is the sum of the images' own losses, so each image gets exactly its own gradients, and Adam
   is elementwise; weights and dropout masks come from each image's own generator in the per-image order. The
   result equals :func:`propagate_a2gnn`'s (the reference path) up to float summation order, which 100 epochs
   amplify to ~1e-4 in the scores (as a 1e-7 relative change of the inputs does; labels agree).

Deviations from the reference (incidental per the study's section 6.2, or forced by our data, except the first):

- The padding of the image to a multiple of s carries no seed (ignore); the reference pads the seed map with 0
  (background) for image, point and scribble supervision, so up to s - 1 rows and columns of padding pull the
  bottom and right border nodes towards background; for boxes it pads with ignore, as we do.
- Output and random walk are aligned to the padded grid (upsample x s, crop); the reference stretches the GNN's
  padded grid onto the unpadded image.
- Window neighbours off the grid are ignored in the pair labels and the Gated-CRF/gated kernels (the reference's
  unfold pads them with label 0 = background and zero features: a border artefact; for the Gated CRF the
  difference is a constant).
- An image with no seed at the losses' resolution gets no GNN: it keeps the CAM label's scores (a constant
  background plane ``cam_bg_threshold`` before the CAMs), as Propagate does for empty seeds. Seed labels not
  among the image's classes (``keys``) are ignored, and so are boxes of such classes.
- Seeds: one per image from ``a2gnn_seed`` and the image id (weights, betas, dropout masks); the reference does
  not seed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from data.labelspace import IGNORE_INDEX
from data.transforms import normalize
from models.a2gnn import (
    A2GNN,
    A2GNNBatch,
    WindowGraph,
    block_centres,
    rgbxy_kernel,
)
from stages.config import PropagateConfig
from stages.metrics import with_background
from stages.propagation.method import AFFINITY_NET, MethodInputs, PropagationMethod
from stages.refine.crf import CRF_PRESETS, refine
from stages.runtime import image_seed

SUPERVISIONS = ("image", "point", "scribble", "box")
LOSS_RESOLUTIONS = ("image", "grid")
# What the registered propagation method reads from its ``affinity`` dict (besides the optional "supervision",
# "boxes" and "affinity_stride").
A2GNN_INPUTS = ("window_affinity", "node_features", "rgb", "image_id", "seeds", "keys")


# ------------------------------------------------------------------------------------------------ losses


def seed_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """CE over background seeds + CE over foreground seeds (each a mean; an empty set adds nothing)."""
    loss = logits.new_zeros(())
    for chosen in (labels == 0, (labels != IGNORE_INDEX) & (labels > 0)):
        if bool(chosen.any()):
            loss = loss + F.cross_entropy(logits[chosen], labels[chosen])
    return loss


def gated_crf_loss(probs: Tensor, kernel: Tensor, radius: int) -> Tensor:
    """Potts Gated-CRF loss sum_ij K_ij (1 - <y_i, y_j>) / (h w) of probabilities (C, h, w) with a window
    kernel (D, h, w) of that radius (:func:`rgbxy_kernel`; zero off the grid and at the centre)."""
    c, h, w = probs.shape
    diameter = 2 * radius + 1
    neighbours = F.unfold(probs[None], diameter, padding=radius).view(c, diameter * diameter, h, w)
    agreement = (neighbours * probs[:, None]).sum(0)
    return (kernel * (1 - agreement)).sum() / (h * w)


def seed_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """:func:`seed_loss` of every image of a batch: logits (B, N, C), labels (B, N) -> (B,)."""
    per_node = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")   # (B, N)
    loss = per_node.new_zeros(labels.shape[0])
    for chosen in (labels == 0, (labels != IGNORE_INDEX) & (labels > 0)):
        # An empty set adds 0 / 1 = nothing, as in seed_loss.
        loss = loss + (per_node * chosen).sum(1) / chosen.sum(1).clamp(min=1)
    return loss


def gated_crf_losses(probs: Tensor, kernel: Tensor, radius: int) -> Tensor:
    """:func:`gated_crf_loss` of every image of a batch: probs (B, C, h, w), kernels (B, D, h, w) -> (B,)."""
    b, c, h, w = probs.shape
    diameter = 2 * radius + 1
    neighbours = F.unfold(probs, diameter, padding=radius).view(b, c, diameter * diameter, h, w)
    agreement = (neighbours * probs[:, :, None]).sum(1)
    return (kernel * (1 - agreement)).sum((1, 2, 3)) / (h * w)


@dataclass(frozen=True)
class GridBox:
    """A box at the losses' resolution (node cells, or pixels of the padded image): class channel and inclusive
    row / column ranges."""

    channel: int
    y0: int
    y1: int
    x0: int
    x1: int


def bilinear_taps(ys: Tensor, xs: Tensor, grid: tuple[int, int], stride: int) -> tuple[Tensor, Tensor]:
    """The four nodes (P, 4) and weights (P, 4) that give pixels (ys, xs) of the grid's maps upsampled by ``stride``
    (``F.interpolate``, bilinear, align_corners=False: source = (p + 0.5) / s - 0.5, clamped at the borders);
    stride 1 gives each pixel its own node with weight 1."""
    def axis(p: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
        source = ((p.float() + 0.5) / stride - 0.5).clamp(min=0)
        low = source.floor().long().clamp(max=size - 1)
        return low, (low + 1).clamp(max=size - 1), source - low
    y0, y1, fy = axis(ys, grid[0])
    x0, x1, fx = axis(xs, grid[1])
    width = grid[1]
    index = torch.stack([y0 * width + x0, y0 * width + x1, y1 * width + x0, y1 * width + x1], -1)
    weight = torch.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx], -1)
    return index, weight


def sample_taps(values: Tensor, index: Tensor, weight: Tensor) -> Tensor:
    """Node values (N, C) at taps (P, 4) -> (P, C); batched: (B, N, C) at (B, P, 4) -> (B, P, C). Differentiable."""
    if values.dim() == 2:
        gather = values.__getitem__
    else:
        rows = torch.arange(values.shape[0], device=values.device)[:, None]
        def gather(idx: Tensor) -> Tensor:
            return values[rows, idx]
    out = gather(index[..., 0]) * weight[..., 0, None]
    for k in range(1, 4):
        out = out + gather(index[..., k]) * weight[..., k, None]
    return out


@dataclass(frozen=True)
class LossPixels:
    """Where the seed, multi-point and consistency losses read the GNN (``Propagate.a2gnn_loss_resolution``).

    The losses see the node maps upsampled bilinearly by ``stride`` (1 = the node grid itself; s = the padded
    image, as A2GNN's ``F.interpolate`` of the logits to the padded label size). Only labelled pixels enter a
    loss (the check only ever turns labels into ignore), so the losses need the logits there alone: ``ys``, ``xs``
    (..., P) are those pixels (-1 = padding of a stacked batch), ``index`` / ``weight`` (..., P, 4) their bilinear
    taps (:func:`bilinear_taps`; an upsampled map gathered there equals ``F.interpolate``'s up to float rounding,
    without forming it), ``labels`` (..., P) their channel labels (255 = ignore).
    """

    grid: tuple[int, int]
    stride: int
    ys: Tensor
    xs: Tensor
    index: Tensor
    weight: Tensor
    labels: Tensor

    @classmethod
    def labelled(cls, labels: Tensor, grid: tuple[int, int], stride: int) -> LossPixels:
        """The non-ignore pixels of a (grid * stride) label map."""
        ys, xs = torch.nonzero(labels != IGNORE_INDEX, as_tuple=True)
        index, weight = bilinear_taps(ys, xs, grid, stride)
        return cls(tuple(grid), stride, ys, xs, index, weight, labels[ys, xs].long())

    @property
    def count(self) -> int:
        return int(self.ys.shape[-1])

    def sample(self, values: Tensor) -> Tensor:
        """Node values (N, C) or (B, N, C) at the pixels: (P, C) or (B, P, C)."""
        return sample_taps(values, self.index, self.weight)

    def to(self, device: torch.device) -> LossPixels:
        return LossPixels(self.grid, self.stride, *(t.to(device) for t in
                                                    (self.ys, self.xs, self.index, self.weight, self.labels)))

    @staticmethod
    def stack(members: Sequence[LossPixels]) -> LossPixels:
        """One batch (leading image dimension), padded to the largest P with ignore pixels of weight 0."""
        count = max(m.count for m in members)
        def padded(t: Tensor, fill: float) -> Tensor:
            extra = count - t.shape[0]
            return torch.cat([t, t.new_full((extra, *t.shape[1:]), fill)]) if extra else t
        fields = [torch.stack([padded(getattr(m, name), fill) for m in members])
                  for name, fill in (("ys", -1), ("xs", -1), ("index", 0), ("weight", 0), ("labels", IGNORE_INDEX))]
        return LossPixels(members[0].grid, members[0].stride, *fields)

    def with_labels(self, labels: Tensor) -> LossPixels:
        return dataclasses.replace(self, labels=labels)

    def image(self, b: int, labels: Tensor) -> LossPixels:
        """Image ``b`` of a stacked batch (padding kept), carrying ``labels``."""
        return LossPixels(self.grid, self.stride, self.ys[b], self.xs[b], self.index[b], self.weight[b], labels)


def multi_point_loss(logits: Tensor, embedding: Tensor, boxes: list[GridBox], pixels: LossPixels
                     ) -> tuple[Tensor, Tensor]:
    """A2GNN's box multi-point loss with consistency checking; returns (loss, ``pixels.labels`` after the check).

    At the losses' resolution (node logits (N, C) and embedding (N, D) upsampled by ``pixels.stride``; boxes in
    its pixels), per box of class c: the pixel of highest class-c logit in every row and in every column of the
    box; CE of their logits against c, summed over all boxes / the number of points; plus sum (1 - cos) of the
    points' embeddings over all ordered pairs / the number of pairs. Check: labelled pixels of the box labelled c
    whose embedding has cosine < 0 to the mean embedding of the box's points become ignore (in a copy). Only the
    sign matters and the upsampling is linear, so the check reads the upsampled dot product with the mean.
    """
    labels = pixels.labels.clone()
    if not boxes:
        return logits.new_zeros(()), labels
    height, width = pixels.grid
    stride = pixels.stride
    ce, points_total, spread, pairs_total = logits.new_zeros(()), 0, logits.new_zeros(()), 0
    for box in boxes:
        plane = logits.detach()[:, box.channel].reshape(1, 1, height, width)
        if stride > 1:
            plane = F.interpolate(plane, (height * stride, width * stride), mode="bilinear", align_corners=False)
        inside = plane[0, 0, box.y0:box.y1 + 1, box.x0:box.x1 + 1]
        ys = torch.arange(box.y0, box.y1 + 1, device=logits.device)
        xs = torch.arange(box.x0, box.x1 + 1, device=logits.device)
        point_ys = torch.cat([ys, box.y0 + inside.argmax(0)])
        point_xs = torch.cat([box.x0 + inside.argmax(1), xs])
        index, weight = bilinear_taps(point_ys, point_xs, pixels.grid, stride)
        target = torch.full((point_ys.numel(),), box.channel, dtype=torch.long, device=logits.device)
        ce = ce + F.cross_entropy(sample_taps(logits, index, weight), target, reduction="sum")
        points_total += point_ys.numel()
        chosen = sample_taps(embedding, index, weight)
        norms = chosen.norm(dim=1)
        cos = (chosen @ chosen.T) / (norms[:, None] * norms[None, :] + 1e-7)
        spread = spread + (1 - cos).sum()
        pairs_total += point_ys.numel() ** 2
        with torch.no_grad():
            agreement = pixels.sample(embedding.detach() @ chosen.detach().mean(0)[:, None])[:, 0]
            in_box = (pixels.ys >= box.y0) & (pixels.ys <= box.y1) & (pixels.xs >= box.x0) & (pixels.xs <= box.x1)
            labels[in_box & (labels == box.channel) & (agreement < 0)] = IGNORE_INDEX
    return ce / points_total + spread / pairs_total, labels


# ---------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class Schedule:
    """One supervision's training recipe (the reference's values unless the config overrides them)."""

    lr: float
    seed_epochs: int
    gcrf_epochs: int
    gcrf_weight: float
    multi_point: bool
    random_walk: bool


# train_infer_A2GNN_others.py (image, point, scribble) and train_infer_A2GNN_box.py; the random walk is run for
# image and point seeds (the README's scribble command passes --rw False, meant as off).
REFERENCE_SCHEDULES = {
    "image": Schedule(0.03, 50, 50, 0.3, multi_point=False, random_walk=True),
    "point": Schedule(0.03, 50, 50, 0.3, multi_point=False, random_walk=True),
    "scribble": Schedule(0.03, 50, 50, 0.3, multi_point=False, random_walk=False),
    "box": Schedule(0.035, 150, 150, 0.01, multi_point=True, random_walk=False),
}


def resolve_schedule(cfg: PropagateConfig, supervision: str) -> Schedule:
    """The reference schedule of ``supervision`` with every non-zero ``a2gnn_*`` override applied."""
    if supervision not in REFERENCE_SCHEDULES:
        raise ValueError(f"A2GNN supervision {supervision!r}; choose one of {', '.join(SUPERVISIONS)}")
    ref = REFERENCE_SCHEDULES[supervision]
    return Schedule(lr=cfg.a2gnn_lr or ref.lr, seed_epochs=cfg.a2gnn_seed_epochs or ref.seed_epochs,
                    gcrf_epochs=cfg.a2gnn_gcrf_epochs or ref.gcrf_epochs,
                    gcrf_weight=cfg.a2gnn_gcrf_weight or ref.gcrf_weight, multi_point=ref.multi_point,
                    random_walk=ref.random_walk and cfg.a2gnn_rw)


def l1_rows(features: Tensor) -> Tensor:
    """Each row divided by its L1 norm (the reference divides by the sum of its non-negative features)."""
    return features / features.abs().sum(1, keepdim=True).clamp(min=1e-12)


def train_a2gnn(features: Tensor, graph: WindowGraph, pixels: LossPixels, num_classes: int, cfg: PropagateConfig,
                schedule: Schedule, rgb_grid: Tensor, boxes: list[GridBox] | None = None, seed: int = 0
                ) -> tuple[Tensor, Tensor]:
    """Train one fresh :class:`A2GNN` on a graph; returns (logits (N, C), embedding (N, hidden)) in eval mode.

    ``features`` (N, F) L1-normalised node features, ``pixels`` the seeds where the losses read the GNN,
    ``rgb_grid`` (3, h, w) the normalised image on the grid (Gated-CRF kernel), ``boxes`` at the pixels'
    resolution. Everything runs on ``features``' device.
    """
    dev = features.device
    generator = torch.Generator(device=dev)
    generator.manual_seed(seed)
    model = A2GNN(features.shape[1], num_classes, cfg.a2gnn_hidden, cfg.a2gnn_layers, cfg.a2gnn_dropout,
                  cfg.a2gnn_affinity_weight, generator=generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=schedule.lr, weight_decay=cfg.a2gnn_weight_decay)
    grid = (graph.height, graph.width)
    pixels = pixels.to(dev)
    labels = pixels.labels
    kernel = None
    if schedule.gcrf_epochs > 0 and schedule.gcrf_weight > 0:
        kernel = rgbxy_kernel(rgb_grid[None].to(dev), cfg.a2gnn_gcrf_radius, cfg.a2gnn_gcrf_sigma_rgb,
                              cfg.a2gnn_gcrf_sigma_xy)[0]
    for epoch in range(schedule.seed_epochs + schedule.gcrf_epochs):
        model.train()
        optimizer.zero_grad(set_to_none=True)
        logits, embedding = model(features, graph)
        loss = logits.new_zeros(())
        if schedule.multi_point and boxes:
            # The reference checks first, so this epoch's seed loss already sees the dropped nodes.
            mp, labels = multi_point_loss(logits, embedding, boxes, pixels.with_labels(labels))
            loss = loss + cfg.a2gnn_mp_weight * mp
        loss = loss + seed_loss(pixels.sample(logits), labels)
        if kernel is not None and epoch >= schedule.seed_epochs:
            probs = torch.softmax(logits, dim=1).T.reshape(num_classes, *grid)
            loss = loss + schedule.gcrf_weight * gated_crf_loss(probs, kernel, cfg.a2gnn_gcrf_radius)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        return model(features, graph)


def train_a2gnn_batch(features: Tensor, graph: WindowGraph, pixels: LossPixels, class_counts: list[int],
                      cfg: PropagateConfig, schedule: Schedule, rgb_grids: Tensor,
                      boxes: Sequence[list[GridBox]] | None = None, seeds: Sequence[int] | None = None
                      ) -> tuple[Tensor, Tensor]:
    """:func:`train_a2gnn` for B images of one grid at once: (logits (B, N, max C), embeddings (B, N, hidden)).

    ``features`` (B, N, F), ``graph`` stacked (:meth:`WindowGraph.stack`), ``pixels`` stacked
    (:meth:`LossPixels.stack`), ``class_counts``
    the images' C, ``rgb_grids`` (B, 3, h, w), ``boxes`` and ``seeds`` per image. Image b's logits beyond its
    C are -1e9 (slice them off). Each image's result equals its own :func:`train_a2gnn` run with its seed, up to
    float summation order: the loss is the sum of the per-image losses and Adam is elementwise.
    """
    count = features.shape[0]
    boxes = list(boxes) if boxes is not None else [[] for _ in range(count)]
    seeds = list(seeds) if seeds is not None else [0] * count
    if not (len(class_counts) == len(boxes) == len(seeds) == pixels.labels.shape[0] == rgb_grids.shape[0] == count):
        raise ValueError(f"train_a2gnn_batch: {count} feature sets but {pixels.labels.shape[0]} label sets, "
                         f"{len(class_counts)} class counts, {rgb_grids.shape[0]} images, {len(boxes)} box lists "
                         f"and {len(seeds)} seeds")
    dev = features.device
    generators = [torch.Generator(device=dev) for _ in seeds]
    for generator, seed in zip(generators, seeds):
        generator.manual_seed(seed)
    model = A2GNNBatch(features.shape[-1], class_counts, cfg.a2gnn_hidden, cfg.a2gnn_layers, cfg.a2gnn_dropout,
                       cfg.a2gnn_affinity_weight, generators=generators)
    optimizer = torch.optim.Adam(model.parameters(), lr=schedule.lr, weight_decay=cfg.a2gnn_weight_decay)
    grid = (graph.height, graph.width)
    pixels = pixels.to(dev)
    labels = pixels.labels
    kernel = None
    if schedule.gcrf_epochs > 0 and schedule.gcrf_weight > 0:
        kernel = rgbxy_kernel(rgb_grids.to(dev), cfg.a2gnn_gcrf_radius, cfg.a2gnn_gcrf_sigma_rgb,
                              cfg.a2gnn_gcrf_sigma_xy)
    multi_point = schedule.multi_point and any(boxes)
    for epoch in range(schedule.seed_epochs + schedule.gcrf_epochs):
        model.train()
        optimizer.zero_grad(set_to_none=True)
        logits, embedding = model(features, graph)
        loss = logits.new_zeros(())
        if multi_point:
            # Per image, as train_a2gnn: points, consistency check, then this epoch's seed loss sees the drops.
            checked = []
            for image, image_boxes in enumerate(boxes):
                if image_boxes:
                    mp, image_labels = multi_point_loss(logits[image], embedding[image], image_boxes,
                                                        pixels.image(image, labels[image]))
                    loss = loss + cfg.a2gnn_mp_weight * mp
                    checked.append(image_labels)
                else:
                    checked.append(labels[image])
            labels = torch.stack(checked)
        loss = loss + seed_losses(pixels.sample(logits), labels).sum()
        if kernel is not None and epoch >= schedule.seed_epochs:
            probs = torch.softmax(logits, dim=-1).transpose(1, 2).reshape(count, -1, *grid)
            loss = loss + schedule.gcrf_weight * gated_crf_losses(probs, kernel, cfg.a2gnn_gcrf_radius).sum()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        return model(features, graph)


# --------------------------------------------------------------------------------------------- inference


def window_random_walk(vectors: Tensor, graph: WindowGraph, beta: float, steps: int) -> Tensor:
    """v T^steps for row vectors (C, N), T = A^beta normalised per column, A the window affinity matrix
    (A_ij = a_ij for j in i's window, A_ii = 1): one window gather per step, so nothing N x N is formed."""
    into = graph.transposed_affinity() ** beta                      # (j, k): A_ij^beta for i = index[j, k]
    into = into * graph.valid
    into = into / into.sum(1, keepdim=True)                           # column sums of A^beta
    walked = vectors
    for _ in range(steps):
        walked = (walked[:, graph.index] * into[None]).sum(-1)
    return walked


def cam_walk_vectors(high_res: np.ndarray, alpha: float, stride: int, grid: tuple[int, int]) -> Tensor:
    """[(1 - max CAM)^alpha; CAMs] zero-padded to the grid's multiple of ``stride`` and average-pooled: (1+K, h, w)."""
    cams = torch.as_tensor(np.asarray(high_res, np.float32))
    background = (1 - cams.max(0).values) ** alpha if cams.shape[0] else torch.ones(cams.shape[1:])
    stack = torch.cat([background[None], cams])
    padded = F.pad(stack, (0, grid[1] * stride - stack.shape[2], 0, grid[0] * stride - stack.shape[1]))
    return F.avg_pool2d(padded[None], stride)[0]


def upsample_grid(maps: Tensor, stride: int, size: tuple[int, int]) -> Tensor:
    """(C, h, w) -> bilinear x stride onto the padded image, cropped to ``size`` (C, H, W)."""
    h, w = maps.shape[-2:]
    up = F.interpolate(maps[None], size=(h * stride, w * stride), mode="bilinear", align_corners=False)[0]
    return up[:, :size[0], :size[1]]


def seed_channels(seeds: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Label-space seeds (H, W) -> channel indices: 0 = background, i + 1 = ``keys[i]``, others 255."""
    lookup = np.full(256, IGNORE_INDEX, np.uint8)
    lookup[0] = 0
    for i, key in enumerate(np.asarray(keys).reshape(-1)):
        if not 1 <= int(key) < IGNORE_INDEX:
            raise ValueError(f"class keys must be label ids in [1, 254], got {int(key)}")
        lookup[int(key)] = i + 1
    return lookup[np.asarray(seeds, np.uint8)]


def grid_boxes(boxes: np.ndarray | None, keys: np.ndarray, size: tuple[int, int], grid: tuple[int, int],
               stride: int, image_id: str) -> list[GridBox]:
    """(M, 5) boxes (label id, x0, y0, x1, y1; inclusive pixel coordinates) -> cells of a ``grid`` whose cells are
    ``stride`` pixels (stride 1: the pixels themselves); boxes of classes not in ``keys`` are left out."""
    if boxes is None:
        return []
    boxes = np.asarray(boxes)
    if boxes.size == 0:
        return []
    if boxes.ndim != 2 or boxes.shape[1] != 5:
        raise ValueError(f"image {image_id!r}: boxes must be (M, 5) = label id, x0, y0, x1, y1, got {boxes.shape}")
    height, width = size
    channel_of = {int(k): i + 1 for i, k in enumerate(np.asarray(keys).reshape(-1))}
    out = []
    for label, x0, y0, x1, y1 in boxes.astype(np.int64).tolist():
        if not (0 <= x0 <= x1 < width and 0 <= y0 <= y1 < height):
            raise ValueError(f"image {image_id!r}: box {[label, x0, y0, x1, y1]} is empty or leaves the "
                             f"{height}x{width} image (inclusive 0-based pixel coordinates)")
        if label in channel_of:
            out.append(GridBox(channel_of[label], min(y0 // stride, grid[0] - 1), min(y1 // stride, grid[0] - 1),
                               min(x0 // stride, grid[1] - 1), min(x1 // stride, grid[1] - 1)))
    return out


def loss_pixels(channels: np.ndarray, grid: tuple[int, int], stride: int, resolution: str) -> LossPixels:
    """The labelled pixels of a channel seed map (H, W) at the losses' resolution: ``image`` = the padded image
    (padding ignored), ``grid`` = the nodes (the seed at each block centre)."""
    if resolution not in LOSS_RESOLUTIONS:
        raise ValueError(f"Propagate.a2gnn_loss_resolution = {resolution!r}; choose one of "
                         f"{', '.join(LOSS_RESOLUTIONS)}")
    labels = torch.from_numpy(channels)
    if resolution == "grid":
        return LossPixels.labelled(block_centres(labels, grid, stride), grid, 1)
    height, width = channels.shape
    padded = F.pad(labels, (0, grid[1] * stride - width, 0, grid[0] * stride - height), value=IGNORE_INDEX)
    return LossPixels.labelled(padded, grid, stride)


def grid_stride(size: tuple[int, int], grid: tuple[int, int], stride: int | None) -> int:
    """The affinity net's stride: the given one (checked), else the smallest s with ceil(H/s), ceil(W/s) = grid."""
    candidates = [stride] if stride is not None else range(1, max(size) + 1)
    for s in candidates:
        if s >= 1 and (math.ceil(size[0] / s), math.ceil(size[1] / s)) == tuple(grid):
            return int(s)
    raise ValueError(f"the affinity grid {tuple(grid)} is not the stride-{stride if stride else 's'} grid of a "
                     f"{size[0]}x{size[1]} image")


@dataclass
class _A2GNNJob:
    """One image ready for GNN training (:func:`_prepare_a2gnn`) and what its inference needs afterwards."""

    image_id: str
    size: tuple[int, int]
    stride: int
    supervision: str
    schedule: Schedule
    high_res: np.ndarray
    rgb: np.ndarray
    graph: WindowGraph
    features: Tensor      # (N, F), L1 rows
    pixels: LossPixels    # the seeds, where the losses read the GNN
    rgb_grid: Tensor      # (3, h, w)
    boxes: list[GridBox]
    seed: int

    @property
    def num_classes(self) -> int:
        return self.high_res.shape[0] + 1

    @property
    def grid(self) -> tuple[int, int]:
        return self.graph.height, self.graph.width


def _prepare_a2gnn(cfg: PropagateConfig, high_res: np.ndarray, window_affinity: np.ndarray,
                   node_features: np.ndarray, rgb: np.ndarray, seeds: np.ndarray, keys: np.ndarray,
                   image_id: str, size: tuple[int, int], device: torch.device | str | None = None,
                   supervision: str = "image", boxes: np.ndarray | None = None, stride: int | None = None
                   ) -> _A2GNNJob | tuple[np.ndarray, np.ndarray]:
    """Check one image's inputs; the final (scores, index) where no GNN is trained, else its training job."""
    height, width = size
    high_res = np.asarray(high_res, np.float32)
    keys = np.asarray(keys).reshape(-1)
    window_affinity = np.asarray(window_affinity, np.float32)
    node_features = np.asarray(node_features, np.float32)
    seeds = np.asarray(seeds)
    if supervision not in SUPERVISIONS:
        raise ValueError(f"image {image_id!r}: supervision {supervision!r}; choose one of {', '.join(SUPERVISIONS)}")
    if high_res.ndim != 3 or high_res.shape != (len(keys), height, width):
        raise ValueError(f"image {image_id!r}: CAMs {high_res.shape} do not match {len(keys)} classes of a "
                         f"{height}x{width} image")
    if seeds.shape != (height, width):
        raise ValueError(f"image {image_id!r}: seed map {seeds.shape} is not the image size {size}")
    if rgb.shape != (height, width, 3) or rgb.dtype != np.uint8:
        raise ValueError(f"image {image_id!r}: image must be uint8 {(height, width, 3)}, got {rgb.dtype} {rgb.shape}")
    if window_affinity.ndim != 3 or node_features.ndim != 3 or window_affinity.shape[1:] != node_features.shape[1:]:
        raise ValueError(f"image {image_id!r}: window affinity {window_affinity.shape} and node features "
                         f"{node_features.shape} must be (D, h, w) and (F, h, w) on one grid")
    grid = tuple(window_affinity.shape[1:])
    stride = grid_stride(size, grid, None if stride is None else int(stride))
    if len(keys) == 0:  # no class: everything is background
        return np.ones((1, height, width), np.float32), np.zeros((height, width), np.uint8)
    pixels = loss_pixels(seed_channels(seeds, keys), grid, stride, cfg.a2gnn_loss_resolution)
    if pixels.count == 0:
        scores = with_background(high_res, cfg.cam_bg_threshold)
        return scores, scores.argmax(0).astype(np.uint8)

    dev = torch.device(device) if device is not None else torch.device("cpu")
    graph = WindowGraph.from_window_affinity(torch.from_numpy(window_affinity).to(dev))
    features = l1_rows(torch.from_numpy(node_features).to(dev).reshape(node_features.shape[0], -1).T)
    schedule = resolve_schedule(cfg, supervision)
    padded = F.pad(torch.from_numpy(normalize(rgb)), (0, grid[1] * stride - width, 0, grid[0] * stride - height))
    rgb_grid = F.interpolate(padded[None], size=grid, mode="bilinear", align_corners=False)[0].to(dev)
    cell = stride // pixels.stride
    cells = grid_boxes(boxes, keys, size, (grid[0] * pixels.stride, grid[1] * pixels.stride), cell,
                       image_id) if schedule.multi_point else []
    return _A2GNNJob(image_id, (height, width), stride, supervision, schedule, high_res, rgb, graph, features,
                     pixels.to(dev), rgb_grid, cells, image_seed(cfg.a2gnn_seed, image_id))


def _finish_a2gnn(cfg: PropagateConfig, job: _A2GNNJob, logits: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Scores and argmax from a trained GNN's logits (N, C): upsampling, random-walk fusion, optional CRF."""
    grid, stride, size, dev = job.grid, job.stride, job.size, job.features.device
    with torch.no_grad():
        probs = torch.softmax(upsample_grid(logits.T.reshape(-1, *grid), stride, size), dim=0)
        if job.schedule.random_walk:
            vectors = cam_walk_vectors(job.high_res, cfg.a2gnn_rw_alpha, stride, grid).to(dev)
            walked = window_random_walk(vectors.reshape(job.num_classes, -1), job.graph, cfg.a2gnn_rw_beta,
                                        2 ** cfg.a2gnn_rw_logt)
            probs = probs + cfg.a2gnn_rw_weight * upsample_grid(walked.reshape(-1, *grid), stride, size)
            probs = probs / probs.sum(0, keepdim=True).clamp(min=1e-12)
    scores = probs.float().cpu().numpy()
    if cfg.a2gnn_crf_preset:
        scores = refine(job.rgb, scores, cfg.a2gnn_crf_preset, device=dev, marginals=True)
    return scores.astype(np.float32), scores.argmax(0).astype(np.uint8)


def propagate_a2gnn(cfg: PropagateConfig, high_res: np.ndarray, window_affinity: np.ndarray,
                    node_features: np.ndarray, rgb: np.ndarray, seeds: np.ndarray, keys: np.ndarray,
                    image_id: str, size: tuple[int, int], device: torch.device | str | None = None,
                    supervision: str = "image", boxes: np.ndarray | None = None, stride: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """A2GNN on one image: (scores (1+K, H, W) float32, background first then ``keys``' classes; argmax uint8).

    ``high_res`` (K, H, W) CAMs of the image's classes ``keys`` (label ids); ``window_affinity`` (D, h, w) and
    ``node_features`` (F, h, w) from :func:`infer_window_graph`; ``seeds`` (H, W) label ids, 255 = ignore;
    ``boxes`` (M, 5) for box supervision. Seeds that are all ignore on the grid: the CAM label's scores.
    The per-image reference path of :func:`propagate_a2gnn_many`.
    """
    job = _prepare_a2gnn(cfg, high_res, window_affinity, node_features, rgb, seeds, keys, image_id, size, device,
                         supervision, boxes, stride)
    if not isinstance(job, _A2GNNJob):
        return job
    logits, _ = train_a2gnn(job.features, job.graph, job.pixels, job.num_classes, cfg, job.schedule, job.rgb_grid,
                            job.boxes, seed=job.seed)
    return _finish_a2gnn(cfg, job, logits)


def propagate_a2gnn_many(cfg: PropagateConfig, items: Sequence[Mapping[str, Any]],
                         device: torch.device | str | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`propagate_a2gnn` on many images, training the GNNs of images that share grid size and supervision
    as one batch; returns each item's (scores, argmax) in order, equal to the per-image path's up to float
    summation order.

    Each item holds one image's keyword arguments of :func:`propagate_a2gnn` (``high_res``, ``window_affinity``,
    ``node_features``, ``rgb``, ``seeds``, ``keys``, ``image_id``, ``size`` and optionally ``supervision``,
    ``boxes``, ``stride``). All of an image group's graphs and features are held at once: the caller bounds the
    batch (``Propagate.a2gnn_batch_images``).
    """
    results: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(items)
    groups: dict[tuple, list[tuple[int, _A2GNNJob]]] = {}
    for position, item in enumerate(items):
        job = _prepare_a2gnn(cfg, **item, device=device)
        if isinstance(job, _A2GNNJob):
            # Node-feature and window sizes come from one affinity net, but a group must share them to stack.
            key = (*job.grid, job.supervision, job.features.shape[1], job.graph.radius, job.pixels.stride)
            groups.setdefault(key, []).append((position, job))
        else:
            results[position] = job
    for members in groups.values():
        jobs = [job for _, job in members]
        logits, _ = train_a2gnn_batch(torch.stack([job.features for job in jobs]),
                                      WindowGraph.stack([job.graph for job in jobs]),
                                      LossPixels.stack([job.pixels for job in jobs]), [job.num_classes for job in jobs],
                                      cfg, jobs[0].schedule, torch.stack([job.rgb_grid for job in jobs]),
                                      [job.boxes for job in jobs], [job.seed for job in jobs])
        for (position, job), image_logits in zip(members, logits):
            results[position] = _finish_a2gnn(cfg, job, image_logits[:, :job.num_classes])
    return results


def validate_a2gnn_config(cfg: PropagateConfig) -> None:
    """Reject ``a2gnn_*`` knobs no run can use, naming the key."""
    for key in ("a2gnn_hidden", "a2gnn_layers", "a2gnn_gcrf_radius", "a2gnn_batch_images"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"Propagate.{key} must be >= 1, got {getattr(cfg, key)}")
    for key in ("a2gnn_lr", "a2gnn_seed_epochs", "a2gnn_gcrf_epochs", "a2gnn_gcrf_weight", "a2gnn_weight_decay",
                "a2gnn_mp_weight", "a2gnn_rw_weight", "a2gnn_rw_logt", "a2gnn_affinity_weight"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"Propagate.{key} must be >= 0 (0 = the reference value where noted), "
                             f"got {getattr(cfg, key)}")
    for key in ("a2gnn_gcrf_sigma_xy", "a2gnn_gcrf_sigma_rgb", "a2gnn_rw_beta", "a2gnn_rw_alpha"):
        if not getattr(cfg, key) > 0:
            raise ValueError(f"Propagate.{key} must be > 0, got {getattr(cfg, key)}")
    if not 0 <= cfg.a2gnn_dropout < 1:
        raise ValueError(f"Propagate.a2gnn_dropout must lie in [0, 1), got {cfg.a2gnn_dropout}")
    if cfg.a2gnn_loss_resolution not in LOSS_RESOLUTIONS:
        raise ValueError(f"Propagate.a2gnn_loss_resolution = {cfg.a2gnn_loss_resolution!r}; choose one of "
                         f"{', '.join(LOSS_RESOLUTIONS)}")
    if cfg.a2gnn_crf_preset:
        CRF_PRESETS.get(cfg.a2gnn_crf_preset, key="Propagate.a2gnn_crf_preset")


def _arguments(cams: dict[str, np.ndarray], inputs: dict[str, np.ndarray], size: tuple[int, int]) -> dict:
    """propagate_a2gnn's per-image keyword arguments from the method's inputs."""
    missing = set(A2GNN_INPUTS) - set(inputs)
    if missing:
        raise ValueError(f"propagation a2gnn needs {', '.join(sorted(missing))} in its inputs (the a2gnn affinity "
                         "net's window graph, the image, its seeds and class keys, as propagate_images passes them)")
    stride = inputs.get("affinity_stride")
    return {"high_res": cams["high_res"], "window_affinity": inputs["window_affinity"],
            "node_features": inputs["node_features"], "rgb": inputs["rgb"], "seeds": inputs["seeds"],
            "keys": inputs["keys"], "image_id": str(inputs["image_id"]), "size": size,
            "supervision": str(inputs.get("supervision", "image")), "boxes": inputs.get("boxes"),
            "stride": None if stride is None else int(stride)}


def run(cfg: PropagateConfig, cams: dict[str, np.ndarray], inputs: dict[str, np.ndarray],
        size: tuple[int, int], device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """A2GNN: a fresh affinity-attention GNN per image on the a2gnn net's window graph, trained on the seeds.
    Reads "seeds" (label ids), "keys", "supervision" and "boxes" from ``inputs`` too."""
    return propagate_a2gnn(cfg, **_arguments(cams, inputs, size), device=device)


def run_batch(cfg: PropagateConfig, batch: Sequence[tuple[dict, dict, tuple[int, int]]],
              device: torch.device) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`run` on a batch of (cams, inputs, size): images of one grid size train their GNNs together."""
    return propagate_a2gnn_many(cfg, [_arguments(*args) for args in batch], device)


METHOD = PropagationMethod(
    name="a2gnn", run=run, trained_by=AFFINITY_NET, affinity_method="a2gnn", inputs=MethodInputs(image=True),
    run_batch=run_batch, batch_knob="a2gnn_batch_images", validate=validate_a2gnn_config,
    final_crf="a2gnn_final", affinity_overrides={"box": {"window_radius": 4}, "scribble": {"window_radius": 4}},
    reference="A2GNN, Zhang et al. TPAMI 2021 (zbf1991/A2GNN)")

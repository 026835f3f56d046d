"""DSRG (Huang et al., CVPR 2018): seeded region growing during segmentation training, and the SEC/DSRG losses.

A training loop calls this every iteration, on the network's output grid (41x41 for a 321 crop):

    probs = floored_softmax(logits, cfg.softmax_floor)                  # (B, C, h, w), keeps the graph
    refined = crf_refine(probs.detach(), images, cfg.crf)               # CRF marginals, (B, C, h, w)
    labels = grow_seeds(refined, seeds, present, cfg)                   # (B, h, w) int64, 255 = ignore
    loss = balanced_seed_loss(probs, labels, cfg.count_floor) + constrain_loss(probs, refined, cfg.constrain_clip)

or all of it at once with :func:`dsrg_step`. ``seeds`` are always the **original** cues (DSRG restarts from them
every iteration, speedinghzl/DSRG issue #9); the grown labels are never fed back.

Growing rule (speedinghzl/DSRG ``pylayers.UpdateSeedLayer3``, used by ``train-s.prototxt``):

1. On the CRF-refined probabilities, each pixel takes the best class among the image's classes (background
   always included) and its probability q. It is a candidate of that class when q > ``fg_threshold`` for a
   foreground class, q > ``bg_threshold`` for background.
2. A label map starts from the seeds; candidates overwrite it (so a CRF-confident pixel of another class stops
   a seed from anchoring growth, as in the reference).
3. For each class c, the 8-connected components of (label map == c) that contain a seed of c are added to c.
   Seed pixels always keep their own label; pixels of classes absent from the image are never labelled.

The losses are shared with DGCN (stages/seed_net/graphcut.py), which uses the same formulas:

- :func:`balanced_seed_loss` (``SeedLossLayer3``; DGCN ``cal_seeding_loss``): mean over images of the mean
  -log p over background-labelled pixels, plus the same over foreground-labelled pixels.
- :func:`constrain_loss` (SEC; ``ConstrainLossLayer``; DGCN ``constrain_loss``): mean over pixels of
  sum_c Q_c log(clip(Q_c / p_c, 0.05, 20)), Q = CRF marginals (no gradient), gradient through p only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from data.labelspace import IGNORE_INDEX
from stages.config import TrainSeedNetConfig
from stages.refine.crf import dense_crf

CRF_UNARIES = ("linear", "log")

# SEC/DSRG/DGCN run the CRF with kernels divided by a "scale factor" of 12 (41x41 grid vs. a 500-pixel image).
_CRF_SCALE_FACTOR = 12.0


@dataclass(frozen=True)
class CRFRefineConfig:
    """The CRF that refines the output probabilities at output resolution (DSRG growing; SEC constrain loss)."""

    # krahenbuhl2013 wrapper (DSRG CRF/krahenbuhl2013/CRF.py) and DGCN crf_inference: sxy 3/12, compat 3
    gaussian: tuple[float, float] = (3.0 / _CRF_SCALE_FACTOR, 3.0)
    # same sources: sxy 80/12, srgb 13, compat 10
    bilateral: tuple[float, float, float] = (80.0 / _CRF_SCALE_FACTOR, 13.0, 10.0)
    iterations: int = 10          # CRF(maxiter=10) / d.inference(10)
    # "linear": unary energy -p (DSRG's krahenbuhl2013 wrapper: set_unary_energy(-probs));
    # "log": -log p (DGCN's pydensecrf port, unary_from_softmax)
    unary: str = "linear"
    prob_floor: float = 1e-4      # pylayers min_prob: probabilities floored before the CRF and after it


@dataclass(frozen=True)
class DSRGConfig:
    """DSRG training-time seed growing and losses (speedinghzl/DSRG train-s.prototxt + pylayers.py)."""

    # The TrainSeedNet.dsrg_* knobs, declared (with DSRG's values) in stages/config.py:
    bg_threshold: float = TrainSeedNetConfig.dsrg_bg_threshold   # UpdateSeedLayer3 th1: background candidates
    fg_threshold: float = TrainSeedNetConfig.dsrg_fg_threshold   # UpdateSeedLayer3 th2: foreground candidates
    connectivity: int = TrainSeedNetConfig.dsrg_connectivity     # CC_labeling_8; 4 also accepted
    softmax_floor: float = 1e-4   # SoftmaxLayer: softmax + min_prob, renormalised
    count_floor: float = 1e-4     # SeedLossLayer3: T.maximum(count, min_prob)
    constrain_clip: tuple[float, float] = (0.05, 20.0)   # ConstrainLossLayer T.clip(Q / p, 0.05, 20)
    crf: CRFRefineConfig = field(default_factory=CRFRefineConfig)


class LabelStep(NamedTuple):
    """One training iteration's supervision update and losses (the loss keeps the graph to the logits)."""

    loss: torch.Tensor            # seed_loss + constrain_loss (weights 1/1 in DSRG and DGCN)
    seed_loss: torch.Tensor
    constrain_loss: torch.Tensor
    labels: torch.Tensor          # (B, h, w) int64, 255 = ignore: the updated supervision
    probs: torch.Tensor           # (B, C, h, w) floored softmax (with graph)
    refined: torch.Tensor         # (B, C, h, w) CRF marginals (no graph)


# ----------------------------------------------------------------------------------------------------------------
# Input checks shared with stages/seed_net/graphcut.py


def as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def check_label_inputs(probs: np.ndarray, seeds: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Validate (B, C, h, w) probabilities, (B, h, w) seeds and (B, C) present flags; returns the present flags
    with background (class 0) forced on, as in DSRG and DGCN, which both add it to every image label."""
    if probs.ndim != 4:
        raise ValueError(f"probabilities must have shape (B, C, h, w), got {probs.shape}")
    b, c, h, w = probs.shape
    if c < 2:
        raise ValueError(f"probabilities need at least 2 classes (background + one), got {c}")
    if seeds.shape != (b, h, w):
        raise ValueError(f"seeds must have shape (B, h, w) = {(b, h, w)} like the probabilities, got {seeds.shape}")
    if not np.issubdtype(seeds.dtype, np.integer):
        raise ValueError(f"seeds must be an integer label map (255 = ignore), got dtype {seeds.dtype}")
    bad = (seeds != IGNORE_INDEX) & ((seeds < 0) | (seeds >= c))
    if bad.any():
        raise ValueError(f"seed labels must lie in [0, {c}) or be {IGNORE_INDEX}; "
                         f"found {np.unique(seeds[bad]).tolist()}")
    if present.shape != (b, c):
        raise ValueError(f"present must have shape (B, C) = {(b, c)}, got {present.shape}")
    if present.dtype != np.bool_:
        raise ValueError(f"present must be a bool array, got dtype {present.dtype}")
    if not np.isfinite(probs).all():
        raise ValueError("probabilities contain NaN or inf")
    present = present.copy()
    present[:, 0] = True
    seeded = seeds != IGNORE_INDEX
    image_index = np.broadcast_to(np.arange(b)[:, None, None], seeds.shape)
    absent_seed = seeded & ~present[image_index, np.where(seeded, seeds, 0)]
    if absent_seed.any():
        which = sorted({(int(i), int(k)) for i, k in zip(image_index[absent_seed], seeds[absent_seed])})
        raise ValueError(f"seeds of classes not marked present (image, class): {which[:10]}")
    return present


# ----------------------------------------------------------------------------------------------------------------
# Probabilities and CRF


def floored_softmax(logits: torch.Tensor, floor: float) -> torch.Tensor:
    """softmax over dim 1, plus ``floor``, renormalised (DSRG SoftmaxLayer 1e-4; DGCN ``softmax`` 1e-7)."""
    probs = torch.softmax(logits, dim=1) + floor
    return probs / probs.sum(dim=1, keepdim=True)


def resize_images(images, size: tuple[int, int]) -> np.ndarray:
    """uint8 (B, H, W, 3) -> uint8 (B, h, w, 3): bilinear with corners aligned, rounded.

    DSRG zooms the image with ``scipy.ndimage.zoom(order=1)``, which maps corner pixel centres onto each other
    (align_corners), then rounds (hustvl DGCN truncates; incidental)."""
    images = as_numpy(images)
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (B, H, W, 3), got {images.dtype} {images.shape}")
    if images.shape[1:3] == tuple(size):
        return np.ascontiguousarray(images)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def crf_refine(probs, images, cfg: CRFRefineConfig = CRFRefineConfig()) -> torch.Tensor:
    """CRF marginals (B, C, h, w) float32 of output probabilities (B, C, h, w) on images uint8 (B, H, W, 3)
    downsampled to (h, w); probabilities floored at ``prob_floor`` before, floored and renormalised after
    (DSRG CRFLayer / UpdateSeedLayer3.refinement; DGCN crf_operation). Returned on the probabilities' device."""
    if cfg.unary not in CRF_UNARIES:
        raise ValueError(f"CRF unary must be one of {CRF_UNARIES}, got {cfg.unary!r}")
    device = probs.device if isinstance(probs, torch.Tensor) else torch.device("cpu")
    p = as_numpy(probs).astype(np.float32)
    if p.ndim != 4:
        raise ValueError(f"probabilities must have shape (B, C, h, w), got {p.shape}")
    rgb = resize_images(images, p.shape[2:])
    if rgb.shape[0] != p.shape[0]:
        raise ValueError(f"{rgb.shape[0]} images for {p.shape[0]} probability maps")
    p = np.maximum(p, cfg.prob_floor)
    # dense_crf's unary is -log(scores); exp(p - 1) turns that into 1 - p, which differs from DSRG's -p by a
    # constant per pixel, and mean-field inference is invariant to such a shift.
    scores = np.exp(p - 1.0) if cfg.unary == "linear" else p
    out = np.stack([dense_crf(rgb[i], scores[i], tuple(cfg.gaussian), tuple(cfg.bilateral), cfg.iterations)
                    for i in range(p.shape[0])])
    out = np.maximum(out, cfg.prob_floor)
    out /= out.sum(axis=1, keepdims=True)
    return torch.from_numpy(out.astype(np.float32)).to(device)


# ----------------------------------------------------------------------------------------------------------------
# Seeded region growing


def _batch_structure(connectivity: int) -> np.ndarray:
    """3-D structuring element that connects pixels within one image of a (B, h, w) stack, never across."""
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    return structure


def grow_seeds(refined, seeds, present, cfg: DSRGConfig = DSRGConfig()) -> torch.Tensor:
    """DSRG seeded region growing: labels (B, h, w) int64 (255 = ignore) from CRF-refined probabilities
    (B, C, h, w), the original seeds (B, h, w) int (255 = ignore) and the image's classes ``present`` (B, C) bool.

    Vectorised: one ``scipy.ndimage.label`` per class over the whole batch; returned on ``refined``'s device."""
    device = refined.device if isinstance(refined, torch.Tensor) else torch.device("cpu")
    q = as_numpy(refined)
    s = as_numpy(seeds)
    present = check_label_inputs(q, s, as_numpy(present))
    s = s.astype(np.int64)
    masked = np.where(present[:, :, None, None], q, -np.inf)
    best = masked.argmax(axis=1)                     # first maximum among present classes, like np.argmax there
    confidence = np.take_along_axis(masked, best[:, None], axis=1)[:, 0]
    # Literal reference test: q > th_fg, and for background also q > th_bg.
    candidate = (confidence > cfg.fg_threshold) & ((best != 0) | (confidence > cfg.bg_threshold))
    region = np.where(candidate, best, np.where(s != IGNORE_INDEX, s, -1))
    grown = s.copy()
    unlabeled = s == IGNORE_INDEX
    structure = _batch_structure(cfg.connectivity)
    for c in np.flatnonzero(present.any(axis=0)):
        mask = region == c
        anchors = mask & (s == c)
        if not anchors.any():
            continue
        components, _ = ndimage.label(mask, structure=structure)
        anchored = np.unique(components[anchors])
        grown[np.isin(components, anchored) & unlabeled] = c
    return torch.from_numpy(grown).to(device)


def update_labels(probs, images, seeds, present, cfg: DSRGConfig = DSRGConfig(),
                  refined: torch.Tensor | None = None) -> torch.Tensor:
    """DSRG supervision for this iteration: CRF-refine ``probs`` (B, C, h, w) on ``images`` uint8 (B, H, W, 3)
    (or reuse ``refined``), then :func:`grow_seeds` from the original ``seeds``. Returns (B, h, w) int64."""
    if refined is None:
        refined = crf_refine(probs, images, cfg.crf)
    return grow_seeds(refined, seeds, present, cfg)


# ----------------------------------------------------------------------------------------------------------------
# Losses (shared with DGCN)


def balanced_seed_loss(probs: torch.Tensor, labels: torch.Tensor, count_floor: float = 1e-4) -> torch.Tensor:
    """Balanced seeding loss: -mean_b[sum_{label 0} log p_0 / n_bg] - mean_b[sum_{label>=1} log p_label / n_fg],
    counts floored at ``count_floor`` (an image without such pixels adds 0). ``probs`` (B, C, h, w) must be
    floored probabilities (log is taken directly); ``labels`` (B, h, w) int with 255 = ignore."""
    if probs.ndim != 4 or labels.shape != (probs.shape[0], *probs.shape[2:]):
        raise ValueError(f"seed loss needs probs (B, C, h, w) and labels (B, h, w); got {tuple(probs.shape)} "
                         f"and {tuple(labels.shape)}")
    labels = labels.to(probs.device).long()
    valid = labels != IGNORE_INDEX
    log_p = torch.log(probs).gather(1, torch.where(valid, labels, 0)[:, None])[:, 0]
    is_bg = (valid & (labels == 0)).to(probs.dtype)
    is_fg = (valid & (labels > 0)).to(probs.dtype)
    floor = torch.tensor(count_floor, dtype=probs.dtype, device=probs.device)
    bg = (is_bg * log_p).sum(dim=(1, 2)) / torch.maximum(is_bg.sum(dim=(1, 2)), floor)
    fg = (is_fg * log_p).sum(dim=(1, 2)) / torch.maximum(is_fg.sum(dim=(1, 2)), floor)
    return -bg.mean() - fg.mean()


def constrain_loss(probs: torch.Tensor, refined: torch.Tensor,
                   clip: tuple[float, float] = (0.05, 20.0)) -> torch.Tensor:
    """SEC constrain-to-boundary loss: mean over (b, pixel) of sum_c Q_c log(clip(Q_c / p_c)), Q = ``refined``
    (treated as a constant), gradient through ``probs`` only (zero where the ratio is clipped)."""
    if probs.shape != refined.shape:
        raise ValueError(f"constrain loss needs equal shapes, got {tuple(probs.shape)} and {tuple(refined.shape)}")
    q = refined.detach().to(device=probs.device, dtype=probs.dtype)
    return (q * torch.log(torch.clamp(q / probs, clip[0], clip[1]))).sum(dim=1).mean()


def dsrg_step(logits: torch.Tensor, images, seeds, present, cfg: DSRGConfig = DSRGConfig()) -> LabelStep:
    """One DSRG iteration from the network's logits (B, C, h, w): floored softmax, CRF, growing, both losses."""
    probs = floored_softmax(logits, cfg.softmax_floor)
    refined = crf_refine(probs.detach(), images, cfg.crf)
    labels = grow_seeds(refined, seeds, present, cfg).to(logits.device)
    seed = balanced_seed_loss(probs, labels, cfg.count_floor)
    constrain = constrain_loss(probs, refined, cfg.constrain_clip)
    return LabelStep(seed + constrain, seed, constrain, labels, probs, refined)

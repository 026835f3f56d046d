"""Confident seeds from full-resolution CAMs: foreground, background and 255 = ignore.

Every rule in :data:`SEED_METHODS` has the signature
``fn(rgb, cam_high, keys, cfg) -> Seeds``: ``rgb`` uint8 (H, W, 3), ``cam_high`` float (K, H, W) in [0, 1]
for the image's K present classes, ``keys`` their 1-based label ids.

- ``irn`` (IRN ``cam_to_ir_label``): a constant background plane at ``fg_threshold`` and one at
  ``bg_threshold``, each argmax refined by the label CRF; foreground from the strict pass, background where
  both passes say background, ignore elsewhere.
- ``psa`` (PSA/SEAM): CRF marginals of [(1 - max CAM)^alpha; CAMs] with alpha low ("la") and high ("ha");
  label = la argmax, la-background -> ignore, ha-background -> background.
- ``a2gnn`` (A2GNN ``infer_SEAM``): the psa label, kept only where the CAM is confident (top fraction of each
  class inside its own argmax region; background where it wins the argmax with (1 - max)^alpha_high above
  ``bg_confidence``) and the CRF is confident (max of [ha bg, la classes] at least ``crf_confidence``).

:class:`SeedQuality` scores seeds against GT (precision, recall, coverage per class).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from data.labelspace import IGNORE_INDEX
from models.registry import Registry
from stages.config import ExtractSeedsConfig
from stages.refine.crf import dense_crf, label_crf

# A2GNN ranks a class's CAM values only above this floor (hard-coded in the reference).
A2GNN_CAM_FLOOR = 0.01
# CAMs come from make_cam divided by (max + 1e-5); allow a little rounding above 1.
CAM_TOLERANCE = 1e-4


@dataclass
class Seeds:
    """One image's seeds: ``label`` uint8 (H, W) of label ids with 255 = ignore; optional score maps."""

    label: np.ndarray
    scores: dict[str, np.ndarray] = field(default_factory=dict)


SeedMethod = Callable[[np.ndarray, np.ndarray, Sequence[int], ExtractSeedsConfig], Seeds]
SEED_METHODS: Registry[SeedMethod] = Registry("seed method")


# ----------------------------------------------------------------------------------------------- helpers

def _check_inputs(rgb: np.ndarray, cam_high: np.ndarray, keys: Sequence[int]) -> np.ndarray:
    """Validate one image's inputs and return the CAMs as float32."""
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"seed image must be uint8 (H, W, 3), got {getattr(rgb, 'dtype', type(rgb))} "
                         f"{getattr(rgb, 'shape', '')}")
    cam = np.asarray(cam_high)
    if cam.ndim != 3:
        raise ValueError(f"high-resolution CAM must have shape (K, H, W), got {cam.shape}")
    if cam.shape[1:] != rgb.shape[:2]:
        raise ValueError(f"high-resolution CAM size {cam.shape[1:]} differs from the image size {rgb.shape[:2]}")
    if len(keys) != cam.shape[0]:
        raise ValueError(f"{len(keys)} class keys for {cam.shape[0]} CAM channels")
    if any(not 1 <= int(k) < IGNORE_INDEX for k in keys):
        raise ValueError(f"class keys must be label ids in 1..{IGNORE_INDEX - 1}, got {list(keys)}")
    cam = cam.astype(np.float32, copy=False)
    if cam.size and not (np.isfinite(cam).all() and cam.min() >= 0 and cam.max() <= 1 + CAM_TOLERANCE):
        raise ValueError(f"high-resolution CAM values must be finite and in [0, 1], got range "
                         f"[{np.nanmin(cam):.4g}, {np.nanmax(cam):.4g}]")
    return cam


def _label_lookup(keys: Sequence[int]) -> np.ndarray:
    """Plane index (0 = background, i + 1 = keys[i]) -> label id."""
    return np.asarray([0, *keys], np.uint8)


def _max_cam(cam: np.ndarray) -> np.ndarray:
    return cam.max(0) if cam.shape[0] else np.zeros(cam.shape[1:], cam.dtype)


def _power_background(cam: np.ndarray, alpha: float) -> np.ndarray:
    """(1 - max CAM)^alpha: PSA's background score, stacked in front of the CAMs (K+1, H, W)."""
    bg = np.power(np.clip(1 - _max_cam(cam), 0, 1), alpha, dtype=np.float32)
    return np.concatenate([bg[None], cam])


def _score_crf(rgb: np.ndarray, cam: np.ndarray, alpha: float, cfg: ExtractSeedsConfig) -> np.ndarray:
    """CRF marginals (K+1, H, W) of the unnormalised background/CAM stack."""
    return dense_crf(rgb, _power_background(cam, alpha), cfg.crf_gaussian, cfg.score_crf_bilateral,
                     cfg.crf_iterations)


def _la_ha_label(la: np.ndarray, ha: np.ndarray, lookup: np.ndarray) -> np.ndarray:
    """PSA's rule: la argmax; la-background -> ignore; ha-background -> background."""
    la_arg, ha_arg = la.argmax(0), ha.argmax(0)
    label = lookup[la_arg]
    label[la_arg == 0] = IGNORE_INDEX
    label[ha_arg == 0] = 0
    return label


# --------------------------------------------------------------------------------------------- the rules

@SEED_METHODS.register("irn")
def irn_seeds(rgb: np.ndarray, cam_high: np.ndarray, keys: Sequence[int], cfg: ExtractSeedsConfig) -> Seeds:
    """IRN: strict (fg_threshold) and loose (bg_threshold) background planes, each refined by the label CRF."""
    cam = _check_inputs(rgb, cam_high, keys)
    lookup = _label_lookup(keys)

    def refined(threshold: float) -> np.ndarray:
        planes = np.concatenate([np.full((1, *cam.shape[1:]), threshold, np.float32), cam])
        hard = planes.argmax(0)  # ties go to the background plane
        crf = label_crf(rgb, hard, len(planes), cfg.label_crf_gt_prob, cfg.crf_gaussian, cfg.label_crf_bilateral,
                        cfg.crf_iterations)
        return lookup[crf]

    fg_pass = refined(cfg.fg_threshold)
    bg_pass = refined(cfg.bg_threshold)
    label = fg_pass.copy()
    label[fg_pass == 0] = IGNORE_INDEX
    label[(fg_pass == 0) & (bg_pass == 0)] = 0
    return Seeds(label)


@SEED_METHODS.register("psa")
def psa_seeds(rgb: np.ndarray, cam_high: np.ndarray, keys: Sequence[int], cfg: ExtractSeedsConfig) -> Seeds:
    """PSA/SEAM: la (alpha_low) and ha (alpha_high) CRF marginals; returns them as scores "la" and "ha"."""
    cam = _check_inputs(rgb, cam_high, keys)
    la = _score_crf(rgb, cam, cfg.alpha_low, cfg)
    ha = _score_crf(rgb, cam, cfg.alpha_high, cfg)
    return Seeds(_la_ha_label(la, ha, _label_lookup(keys)), {"la": la, "ha": ha})


def _top_fraction_mask(score: np.ndarray, region: np.ndarray, top_fraction: float) -> np.ndarray:
    """Pixels of ``region`` whose score is in the top ``top_fraction`` of the region's scores above the floor."""
    inside = np.where(region, score, 0)
    ranked = np.sort(inside[inside > A2GNN_CAM_FLOOR])
    cut = math.floor(ranked.size * (1 - top_fraction))
    if cut >= 1:
        return inside > ranked[cut]
    if top_fraction >= 1:  # keep everything above the floor (the reference would keep nothing here)
        return inside > A2GNN_CAM_FLOOR
    return np.zeros(region.shape, bool)  # too few values to rank: the reference keeps none


@SEED_METHODS.register("a2gnn")
def a2gnn_seeds(rgb: np.ndarray, cam_high: np.ndarray, keys: Sequence[int], cfg: ExtractSeedsConfig) -> Seeds:
    """A2GNN: the psa label where both the CAM (top fraction per class) and the CRF are confident."""
    cam = _check_inputs(rgb, cam_high, keys)
    la = _score_crf(rgb, cam, cfg.alpha_low, cfg)
    ha = _score_crf(rgb, cam, cfg.alpha_high, cfg)
    label = _la_ha_label(la, ha, _label_lookup(keys))

    cam_all = _power_background(cam, cfg.alpha_high)
    cam_arg = cam_all.argmax(0)
    confident_cam = np.zeros(cam_arg.shape, bool)
    # Only planes that survive in the la argmax are considered, as in the reference.
    for plane in np.unique(la.argmax(0)):
        region = cam_arg == plane
        if plane == 0:
            confident_cam |= region & (cam_all[0] > cfg.bg_confidence)
        else:
            confident_cam |= _top_fraction_mask(cam_all[plane], region, cfg.top_fraction)

    # CRF confidence: background from the ha pass, classes from the la pass.
    crf_best = np.maximum(ha[0], la[1:].max(0)) if cam.shape[0] else ha[0]
    label[~confident_cam | (crf_best < cfg.crf_confidence)] = IGNORE_INDEX
    return Seeds(label, {"la": la, "ha": ha})


def validate_seed_config(cfg: ExtractSeedsConfig) -> None:
    """Reject values no seed rule can use, naming the key."""
    name = "ExtractSeeds"
    if cfg.seed_method not in SEED_METHODS:
        raise ValueError(f"{name}.seed_method = {cfg.seed_method!r}; choose one of "
                         f"{', '.join(SEED_METHODS.names())}")
    for key in ("alpha_low", "alpha_high"):
        if not getattr(cfg, key) > 0:
            raise ValueError(f"{name}.{key} must be positive, got {getattr(cfg, key)}")
    for key in ("fg_threshold", "bg_threshold", "bg_confidence", "crf_confidence"):
        if not 0 <= getattr(cfg, key) <= 1:
            raise ValueError(f"{name}.{key} must be in [0, 1], got {getattr(cfg, key)}")
    if not 0 < cfg.top_fraction <= 1:
        raise ValueError(f"{name}.top_fraction must be in (0, 1], got {cfg.top_fraction}")
    if not 0 < cfg.label_crf_gt_prob < 1:
        raise ValueError(f"{name}.label_crf_gt_prob must be in (0, 1), got {cfg.label_crf_gt_prob}")
    if cfg.crf_iterations < 1:
        raise ValueError(f"{name}.crf_iterations must be at least 1, got {cfg.crf_iterations}")
    if len(cfg.crf_gaussian) != 2 or cfg.crf_gaussian[0] <= 0:
        raise ValueError(f"{name}.crf_gaussian must be (sxy > 0, compat), got {cfg.crf_gaussian}")
    for key in ("label_crf_bilateral", "score_crf_bilateral"):
        kernel = getattr(cfg, key)
        if len(kernel) != 3 or kernel[0] <= 0 or kernel[1] <= 0:
            raise ValueError(f"{name}.{key} must be (sxy > 0, srgb > 0, compat), got {kernel}")
    if cfg.shard_size < 1:
        raise ValueError(f"{name}.shard_size must be at least 1, got {cfg.shard_size}")


def extract_seeds(rgb: np.ndarray, cam_high: np.ndarray, keys: Sequence[int], cfg: ExtractSeedsConfig) -> Seeds:
    """Seeds of one image with the configured rule."""
    return SEED_METHODS.get(cfg.seed_method)(rgb, cam_high, keys, cfg)


# --------------------------------------------------------------------------------------------- quality

class SeedQuality:
    """Accumulates seed-vs-GT counts over a dataset (GT 255 ignored; seed 255 = no seed)."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        if num_classes < 1:
            raise ValueError(f"SeedQuality needs at least one class, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        # rows = GT class, columns = seed class, last column = unseeded (seed 255)
        self.counts = np.zeros((num_classes, num_classes + 1), np.int64)
        self.images = 0
        self.empty_images = 0

    def add(self, seed_label: np.ndarray, gt_label: np.ndarray) -> None:
        if seed_label.shape != gt_label.shape:
            raise ValueError(f"seed shape {seed_label.shape} differs from GT shape {gt_label.shape}")
        seed = seed_label.reshape(-1).astype(np.int64)
        gt = gt_label.reshape(-1).astype(np.int64)
        c = self.num_classes
        seeded = seed != self.ignore_index
        if np.any(seed[seeded] >= c) or np.any(seed < 0):
            raise ValueError(f"seed value outside 0..{c - 1} and {self.ignore_index}: {np.unique(seed).tolist()}")
        keep = gt != self.ignore_index
        if np.any(gt[keep] >= c) or np.any(gt < 0):
            raise ValueError(f"GT value outside 0..{c - 1} and {self.ignore_index}: {np.unique(gt).tolist()}")
        column = np.where(seeded, seed, c)[keep]
        self.counts += np.bincount(gt[keep] * (c + 1) + column, minlength=c * (c + 1)).reshape(c, c + 1)
        self.images += 1
        self.empty_images += int(not seeded.any())

    def summary(self, class_names: Sequence[str]) -> dict:
        """Per-class precision / recall / coverage and overall figures; undefined ratios are NaN."""
        if len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names for {self.num_classes} classes")
        conf = self.counts[:, : self.num_classes].astype(np.float64)  # seeded pixels only
        tp = np.diag(conf)
        gt_total = self.counts.sum(1).astype(np.float64)
        seeded_as = conf.sum(0)
        gt_seeded = conf.sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = tp / seeded_as
            recall = tp / gt_total
            coverage = gt_seeded / gt_total
            iou = tp / (gt_seeded + seeded_as - tp)
        total, labelled = gt_total.sum(), conf.sum()
        per_class = {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "coverage": float(coverage[i]),
                   "gt_pixels": int(gt_total[i]), "seeded_pixels": int(seeded_as[i])}
            for i, name in enumerate(class_names)
        }
        return {
            "classes": per_class,
            "labelled_fraction": float(labelled / total) if total else math.nan,
            "precision": float(tp.sum() / labelled) if labelled else math.nan,
            "miou": float(np.nanmean(iou)) if not np.all(np.isnan(iou)) else math.nan,
            "iou": iou.tolist(),
            "images": self.images,
            "empty_images": self.empty_images,
        }

"""``EvalSegmentation``: predictions on the val list with the test-time CRF, palette PNGs and the metrics
(and the report gallery's predictions). Only the evaluation runs this module: editing it never retrains DeepLab.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from data.manifest import Manifest
from stages.config import EvalSegmentationConfig, validate
from stages.metrics import confusion, segmentation_scores
from stages.segmentation.model import predict_probs


def bounded_size(height: int, width: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) scaled down, aspect kept, to at most ``max_pixels`` pixels; unchanged when it fits or
    ``max_pixels`` is 0."""
    if max_pixels <= 0 or height * width <= max_pixels:
        return height, width
    factor = math.sqrt(max_pixels / (height * width))
    return max(1, math.floor(height * factor)), max(1, math.floor(width * factor))


def predict_labels(model: nn.Module, rgb: np.ndarray, cfg: EvalSegmentationConfig, device: torch.device,
                   crf_backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """EvalSegmentation's prediction of one image: the argmax (H, W) uint8 of :func:`predict_probs` at
    ``cfg.scales`` (and flip), and the same after ``cfg.crf_preset`` (the argmax again when ``cfg.crf`` is off).

    An image above ``cfg.max_pixels`` is predicted and refined at :func:`bounded_size` and both label maps are
    upsampled (nearest) to (H, W): the class scores, the network's activations and the CRF, which grow with the
    pixels times the classes, never see more than ``max_pixels`` pixels (times the largest scale squared)."""
    height, width = rgb.shape[:2]
    small = bounded_size(height, width, cfg.max_pixels)
    if small == (height, width):
        return _predict_labels(model, rgb, cfg, device, crf_backend)
    resized = cv2.resize(rgb, small[::-1], interpolation=cv2.INTER_AREA)
    labels = _predict_labels(model, resized, cfg, device, crf_backend)
    return tuple(cv2.resize(m, (width, height), interpolation=cv2.INTER_NEAREST) for m in labels)


def _predict_labels(model: nn.Module, rgb: np.ndarray, cfg: EvalSegmentationConfig, device: torch.device,
                    crf_backend: str) -> tuple[np.ndarray, np.ndarray]:
    from stages.refine.crf import refine

    probs = predict_probs(model, rgb, device, cfg.scales, cfg.flip)
    raw = probs.argmax(0).astype(np.uint8)
    if not cfg.crf:
        return raw, raw
    return raw, refine(rgb, probs, cfg.crf_preset, backend=crf_backend, device=device).astype(np.uint8)


def predict_images(cfg: EvalSegmentationConfig, model: nn.Module, manifest: Manifest, ids: Sequence[str],
                   out_dir: Path, device: torch.device, crf_backend: str = "auto",
                   progress: Callable[[float, str], None] | None = None) -> dict:
    """Predictions ``labels/<id>.png`` (after the CRF when ``cfg.crf``; ``raw/<id>.png`` before it) and the
    confusion matrices of both, as nested lists, for the stage to sum over shards."""
    from data.artifacts import RAW_PREDICTIONS, label_file
    from data.io import write_label_png

    validate(cfg)
    space = manifest.label_space
    n = space.num_classes
    conf_raw = np.zeros((n, n), np.int64)
    conf_crf = np.zeros((n, n), np.int64)
    for k, image_id in enumerate(ids, start=1):
        rgb = manifest.layout.read_image(image_id)
        raw, final = predict_labels(model, rgb, cfg, device, crf_backend)
        gt = manifest.layout.read_label(image_id, evaluation=True)
        conf_raw += confusion(gt, raw, n, space.ignore_index)
        if cfg.crf:
            conf_crf += confusion(gt, final, n, space.ignore_index)
            raw_path = label_file(out_dir, image_id, folder=RAW_PREDICTIONS)
            raw_path.parent.mkdir(parents=True, exist_ok=True)
            write_label_png(raw_path, raw, space.palette)
        path = label_file(out_dir, image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_label_png(path, final, space.palette)
        if progress and (k % 20 == 0 or k == len(ids)):
            progress(100.0 * k / len(ids), f"{k}/{len(ids)} images")
    return {"confusion_raw": conf_raw.tolist(), "confusion_crf": conf_crf.tolist() if cfg.crf else None}


def write_segmentation_metrics(cfg: EvalSegmentationConfig, space, joined: dict, out_dir: Path,
                               labels: str = "pseudo") -> dict:
    """``metrics.json`` from the summed confusion matrices; returns the headline numbers."""
    from data.io import write_json

    raw = segmentation_scores(np.asarray(joined["confusion_raw"]))
    final = segmentation_scores(np.asarray(joined["confusion_crf"])) if cfg.crf else raw
    metrics = {
        "miou": final["miou"], "miou_no_crf": raw["miou"], "crf": cfg.crf, "crf_preset": cfg.crf_preset,
        "per_class_iou": dict(zip(space.names, final["iou"])),
        "per_class_iou_no_crf": dict(zip(space.names, raw["iou"])),
        "pixel_accuracy": final["pixel_accuracy"], "mean_accuracy": final["mean_accuracy"], "fwiou": final["fwiou"],
        "n_images": joined["images"], "scales": list(cfg.scales), "flip": cfg.flip, "trained_on": labels,
        "protocol": "deeplab-pytorch scores(): dataset-level confusion, GT 255 ignored, mIoU over GT-present classes",
    }
    write_json(out_dir / "metrics.json", metrics)
    return {k: metrics[k] for k in ("miou", "miou_no_crf", "pixel_accuracy", "mean_accuracy", "fwiou", "n_images")}

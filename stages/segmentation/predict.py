"""DeepLab inference and evaluation (``EvalSegmentation``; the report's gallery; DGCN/DSRG's predictions): load a
trained segmenter, predict multi-scale + flip class scores, apply the test-time CRF, score against GT.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.artifacts import MODEL_WEIGHTS
from data.manifest import Manifest
from data.transforms import normalize
from models.deeplab import create_segmenter
from stages.config import EvalSegmentationConfig, TrainSegmentationConfig, validate
from stages.metrics import confusion, segmentation_scores


def build_model(cfg: TrainSegmentationConfig, num_classes: int, pretrained: bool = True) -> nn.Module:
    model = create_segmenter(cfg.model, cfg.backbone, num_classes,
                             pretrained=cfg.pretrained if pretrained and cfg.pretrained else None,
                             freeze_bn=cfg.freeze_bn, msc=cfg.msc)
    if pretrained and cfg.init_checkpoint:
        load_matching(model, cfg.init_checkpoint)
    return model


def load_matching(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load a whole segmenter's weights where names and shapes match (deeplab-pytorch loads its COCO init
    non-strictly: a head for other classes stays new). Returns the keys left at their initial values."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: TrainSegmentation.init_checkpoint file is missing") from None
    except Exception as err:
        raise ValueError(f"{path}: cannot load as a weights-only state dict ({err})") from None
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not any(k.startswith(("backbone.", "base.backbone.")) for k in usable):
        raise ValueError(f"{path}: no backbone weight matches this {type(model).__name__} (keys like "
                         f"{next(iter(own))}); is it a checkpoint of the same model and backbone?")
    model.load_state_dict(usable, strict=False)
    return sorted(k for k in own if k not in usable)


def predict_probs(model: nn.Module, rgb: np.ndarray, device: torch.device, scales: Sequence[float] = (1.0,),
                  flip: bool = False, classes: Sequence[int] | None = None, fuse: str = "probs") -> np.ndarray:
    """Class probabilities (C, H, W): softmax of the logits at each scale (and flip), upsampled, averaged.

    ``classes``: keep only these logit channels, in this order (the softmax runs over them alone).
    ``fuse = "logits"``: softmax of the summed upsampled logits instead (hustvl/DGCN make_pred)."""
    if fuse not in ("probs", "logits"):
        raise ValueError(f"fuse must be 'probs' or 'logits', got {fuse!r}")
    h, w = rgb.shape[:2]
    total = None
    with torch.no_grad():
        for s in scales:
            size = (max(1, round(w * s)), max(1, round(h * s)))
            x = torch.from_numpy(normalize(cv2.resize(rgb, size, interpolation=cv2.INTER_LINEAR)))[None].to(device)
            batch = torch.cat([x, x.flip(-1)]) if flip else x
            logits = F.interpolate(model(batch), size=(h, w), mode="bilinear", align_corners=False)
            if classes is not None:
                if min(classes, default=0) < 0 or max(classes, default=0) >= logits.shape[1]:
                    raise ValueError(f"classes {list(classes)} outside the model's {logits.shape[1]} outputs")
                logits = logits[:, list(classes)]
            maps = logits if fuse == "logits" else logits.softmax(1)
            if flip:
                maps = torch.stack([maps[0], maps[1].flip(-1)])
            part = maps.sum(0)
            total = part if total is None else total + part
    if fuse == "logits":
        return total.softmax(0).cpu().numpy()
    return (total / (len(scales) * (2 if flip else 1))).cpu().numpy()


def predict_labels(model: nn.Module, rgb: np.ndarray, cfg: EvalSegmentationConfig, device: torch.device,
                   crf_backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """EvalSegmentation's prediction of one image: the argmax (H, W) uint8 of :func:`predict_probs` at
    ``cfg.scales`` (and flip), and the same after ``cfg.crf_preset`` (the argmax again when ``cfg.crf`` is off)."""
    from stages.refine.crf import refine

    probs = predict_probs(model, rgb, device, cfg.scales, cfg.flip)
    raw = probs.argmax(0).astype(np.uint8)
    if not cfg.crf:
        return raw, raw
    return raw, refine(rgb, probs, cfg.crf_preset, backend=crf_backend, device=device).astype(np.uint8)


def evaluate_model(model: nn.Module, manifest: Manifest, ids: Sequence[str], device: torch.device) -> float:
    """Single-scale val mIoU, for the training log."""
    space = manifest.label_space
    conf = np.zeros((space.num_classes, space.num_classes), np.int64)
    was_training = model.training
    model.eval()
    for image_id in ids:
        pred = predict_probs(model, manifest.layout.read_image(image_id), device).argmax(0)
        conf += confusion(manifest.layout.read_label(image_id, evaluation=True), pred, space.num_classes,
                          space.ignore_index)
    model.train(was_training)
    return segmentation_scores(conf)["miou"]


def load_segmenter(cfg: TrainSegmentationConfig, num_classes: int, directory: str | os.PathLike,
                   device: torch.device) -> nn.Module:
    model = build_model(cfg, num_classes, pretrained=False)
    model.load_state_dict(torch.load(Path(directory) / MODEL_WEIGHTS, map_location="cpu", weights_only=True))
    return model.to(device).eval()


def predict_images(cfg: EvalSegmentationConfig, model: nn.Module, manifest: Manifest, ids: Sequence[str],
                   out_dir: Path, device: torch.device, crf_backend: str = "auto",
                   progress: Callable[[float, str], None] | None = None) -> dict:
    """Predictions ``labels/<id>.png`` (after the CRF when ``cfg.crf``; ``raw/<id>.png`` before it) and the
    confusion matrices of both, as nested lists, for the stage to sum over shards."""
    from data.artifacts import label_file
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
            raw_path = out_dir / "raw" / f"{image_id}.png"
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

"""The DeepLab segmenter of the segmentation step: build it (pretrained weights, a whole-model init), load a
trained one, predict multi-scale + flip class scores, and score it on val. Training (for its val curve) and
evaluation both run this; :mod:`stages.segmentation.predict` adds what only the evaluation runs.
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
from models.segmenters import create_segmenter
from stages.config import TrainSegmentationConfig
from stages.metrics import confusion, segmentation_scores


def ddd_options(cfg: TrainSegmentationConfig) -> dict:
    """The ``ddd_*`` knobs as the CRF's options (``models.ddd.DDDOptions``' fields; ``ddd_early_stop`` 0 never stops
    early). A dict, not the dataclass: only ``deeplabv3_ddd`` imports the solver, so only its keys cover it."""
    return {"iterations": cfg.ddd_iterations, "gamma": cfg.ddd_gamma, "distances": cfg.ddd_distances,
            "alpha": cfg.ddd_alpha, "early_stop": cfg.ddd_early_stop or None, "backend": cfg.ddd_backend}


def build_model(cfg: TrainSegmentationConfig, num_classes: int, pretrained: bool = True) -> nn.Module:
    model = create_segmenter(cfg.model, cfg.backbone, num_classes,
                             pretrained=cfg.pretrained if pretrained and cfg.pretrained else None,
                             freeze_bn=cfg.freeze_bn, msc=cfg.msc, output_stride=cfg.output_stride,
                             ddd=ddd_options(cfg) if cfg.model == "deeplabv3_ddd" else None)
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
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict (parameter name -> tensor)")
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


def evaluate_model(model: nn.Module, manifest: Manifest, ids: Sequence[str], device: torch.device,
                   labels: Callable[[str, tuple[int, int]], np.ndarray] | None = None) -> float:
    """Single-scale mIoU of ``ids`` for the training log, against their GT or ``labels(id, (h, w))``."""
    space = manifest.label_space
    conf = np.zeros((space.num_classes, space.num_classes), np.int64)
    was_training = model.training
    model.eval()
    for image_id in ids:
        rgb = manifest.layout.read_image(image_id)
        pred = predict_probs(model, rgb, device).argmax(0)
        truth = (manifest.layout.read_label(image_id, evaluation=True) if labels is None
                 else labels(image_id, rgb.shape[:2]))
        conf += confusion(truth, pred, space.num_classes, space.ignore_index)
    model.train(was_training)
    return segmentation_scores(conf)["miou"]


def load_segmenter(cfg: TrainSegmentationConfig, num_classes: int, directory: str | os.PathLike,
                   device: torch.device) -> nn.Module:
    model = build_model(cfg, num_classes, pretrained=False)
    model.load_state_dict(torch.load(Path(directory) / MODEL_WEIGHTS, map_location="cpu", weights_only=True))
    return model.to(device).eval()

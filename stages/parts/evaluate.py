"""EvalParts: the part segmenter on val and GMNet's metrics (LTTM/GMNet ``eval.py``, ``vis_parts.py``; spec A.5).

From one dataset-level part confusion matrix (rows GT, columns prediction, 255 ignored):

- ``miou``: the reference's part mIoU: background counted, the mean over parts whose TP + FP + FN > 0;
- ``miou_no_bg``: the same without part 0; ``miou_identifiable``: without the parts the image cannot tell
  apart (embedded data: disc and ring upper/lower, spec A.7);
- ``object_mean_part_iou_zero``: per object (background its own), the mean IoU of its parts with absent parts
  counted 0 (the reference's quirk), then the mean over objects; ``object_mean_part_iou_present``: absent parts
  and objects left out;
- ``object_miou``: the prediction collapsed to objects (object_of_part on both axes of the confusion matrix,
  i.e. against the objects of the part GT, which agree with the object GT outside the border band);
- ``pixel_accuracy``, ``mean_accuracy`` and ``mean_accuracy_no_bg`` (per part: TP / GT pixels).

Adjacency: ``adjacency_error`` is the released GM value with the whole val set as one batch (per-image Grams
add up; K' is the set's), ``adjacency_error_per_image`` its mean over images, and ``cross_object_adjacency``
the share of the prediction's adjacency mass between parts of different objects (0 on the embedded GT).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from data.artifacts import label_file
from data.io import write_label_png
from data.manifest import Manifest
from data.parts import PartLayout, PartSpace
from stages.metrics import confusion
from stages.parts.graph_matching import IGNORE, map_gram, matching_loss, present_classes, restrict
from stages.parts.train import predict_part_probs

ObjectMaps = Callable[[str], np.ndarray]


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """TP / (TP + FP + FN), NaN where the class is neither in the GT nor predicted."""
    conf = conf.astype(np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def _nanmean(values: np.ndarray) -> float | None:
    values = np.asarray(values, np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else None


def collapse(conf: np.ndarray, space: PartSpace) -> np.ndarray:
    """The part confusion matrix summed into objects on both axes."""
    owner = np.zeros((space.num_parts, space.num_objects))
    owner[np.arange(space.num_parts), space.object_of_part] = 1
    return owner.T @ conf @ owner


def part_scores(conf: np.ndarray, space: PartSpace, unidentifiable: Sequence[str] = ()) -> dict:
    """Every confusion-matrix metric of the module docstring."""
    iou = iou_per_class(conf)
    gt_total = conf.sum(1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        accuracy = np.where(gt_total > 0, np.diag(conf) / gt_total, np.nan)
    hidden = [space.parts.names.index(n) for n in unidentifiable if n in space.parts.names]
    identifiable = np.delete(iou, hidden)
    zero, present = [], []
    for obj in range(space.num_objects):
        own = iou[space.parts_of(obj)]
        zero.append(float(np.nan_to_num(own, nan=0.0).mean()))
        present.append(_nanmean(own))
    return {
        "miou": _nanmean(iou), "miou_no_bg": _nanmean(iou[1:]),
        "miou_identifiable": _nanmean(identifiable), "unidentifiable_parts": [space.parts.names[p] for p in hidden],
        "object_mean_part_iou_zero": float(np.mean(zero)),
        "object_mean_part_iou_present": _nanmean(np.array([np.nan if v is None else v for v in present])),
        "object_miou": _nanmean(iou_per_class(collapse(conf, space))),
        "pixel_accuracy": float(np.trace(conf) / max(conf.sum(), 1)),
        "mean_accuracy": _nanmean(accuracy), "mean_accuracy_no_bg": _nanmean(accuracy[1:]),
        "iou": [None if np.isnan(v) else float(v) for v in iou],
        "object_part_iou_zero": zero, "object_part_iou_present": present,
    }


def adjacency_scores(gram_pred: np.ndarray, gram_label: np.ndarray, present: np.ndarray,
                     space: PartSpace) -> dict:
    """Pooled adjacency error and cross-object share from Grams summed over the set (``present``: K ∪ {255->0})."""
    keep = torch.from_numpy(np.asarray(present, bool)).clone()
    keep[keep.nonzero()[:1, 0]] = False
    adj_p = restrict(torch.as_tensor(gram_pred, dtype=torch.float64), keep)
    adj_g = restrict(torch.as_tensor(gram_label, dtype=torch.float64), keep)
    owner = np.asarray(space.object_of_part)
    across = torch.from_numpy(owner[:, None] != owner[None, :])
    mass = adj_p.sum().item()
    return {"adjacency_error": matching_loss(adj_p, adj_g).item(),
            "cross_object_adjacency": adj_p[across].sum().item() / mass if mass else 0.0}


def image_adjacency(pred: np.ndarray, gt: np.ndarray, num_classes: int, dilation: int, valid: str
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """One image's Grams of prediction and GT, the classes it shows (255 read as 0) and its own GM value."""
    p, g = torch.from_numpy(pred.astype(np.int64))[None], torch.from_numpy(gt.astype(np.int64))[None]
    if valid == "same":
        p = torch.where(g == IGNORE, torch.full_like(p, IGNORE), p)
    gram_p, gram_g = map_gram(p, num_classes, dilation), map_gram(g, num_classes, dilation)
    shown = torch.zeros(num_classes, dtype=torch.bool)
    for y in (p, g):
        shown[torch.where(y == IGNORE, torch.zeros_like(y), y).unique()] = True
    keep = present_classes(p, g, num_classes)
    own = matching_loss(restrict(gram_p, keep), restrict(gram_g, keep)).item()
    return gram_p.numpy(), gram_g.numpy(), shown.numpy(), own


def evaluate_part_images(model: torch.nn.Module, manifest: Manifest, layout: PartLayout, maps: ObjectMaps | None,
                         ids: Sequence[str], out_dir: str | os.PathLike, device: torch.device, flip: bool = False,
                         dilation: int = 2, valid: str = "same",
                         progress: Callable[[float, str], None] | None = None) -> dict:
    """Predict ``ids`` (palette PNGs under ``out_dir/labels``) and return the additive parts of the metrics."""
    space = layout.space
    c = space.num_parts
    conf = np.zeros((c, c), np.int64)
    gram_p, gram_g = np.zeros((c, c)), np.zeros((c, c))
    shown = np.zeros(c, bool)
    per_image = []
    for n, image_id in enumerate(ids):
        rgb = manifest.layout.read_image(image_id)
        parts, _ = layout.read(image_id, rgb.shape[:2])
        pred = predict_part_probs(model, rgb, maps(image_id) if maps else None, device, flip).argmax(0)
        pred = pred.astype(np.uint8)
        write_label_png(label_file(Path(out_dir), image_id), pred, space.parts.palette)
        conf += confusion(parts, pred, c)
        gp, gg, s, own = image_adjacency(pred, parts, c, dilation, valid)
        gram_p, gram_g, shown, per_image = gram_p + gp, gram_g + gg, shown | s, [*per_image, own]
        if progress:
            progress(100 * (n + 1) / len(ids), f"{n + 1}/{len(ids)} images")
    return {"confusion": conf.tolist(), "gram_pred": gram_p.tolist(), "gram_label": gram_g.tolist(),
            "shown": shown.tolist(), "adjacency_per_image": per_image}


def summarise_parts(shards: list[dict], space: PartSpace, unidentifiable: Sequence[str]) -> dict:
    """The stage's metrics from its shards' additive parts."""
    conf = sum(np.asarray(m["confusion"], np.int64) for m in shards)
    gram_p = sum(np.asarray(m["gram_pred"]) for m in shards)
    gram_g = sum(np.asarray(m["gram_label"]) for m in shards)
    shown = np.logical_or.reduce([np.asarray(m["shown"], bool) for m in shards])
    per_image = [v for m in shards for v in m["adjacency_per_image"]]
    return {**part_scores(conf, space, unidentifiable), **adjacency_scores(gram_p, gram_g, shown, space),
            "adjacency_error_per_image": float(np.mean(per_image)) if per_image else None,
            "confusion": conf.tolist()}

"""Segmentation evaluation with the standard WSSS protocol.

A dataset-level confusion matrix (never a mean of per-image IoUs), background included, GT 255 ignored,
mIoU = nanmean of per-class IoU. Predicted 255 (seeds, uncertain pixels) is either counted as background
(IRN) or excluded (WSGCN): ``pred_ignore``.

The CAM background-threshold sweep scores every threshold in one pass over the data: per pixel, the best
foreground class c* and its score s* decide the prediction at threshold t (c* if s* > t, else
background), so one histogram over (GT, c*, number of thresholds below s*) gives every threshold's
confusion matrix by a cumulative sum.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def confusion(gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int = 255,
              pred_ignore: str = "background") -> np.ndarray:
    """(num_classes, num_classes) counts, rows = GT, columns = prediction."""
    if gt.shape != pred.shape:
        raise ValueError(f"GT shape {gt.shape} differs from prediction shape {pred.shape}")
    gt = gt.reshape(-1).astype(np.int64)
    pred = pred.reshape(-1).astype(np.int64)
    keep = gt != ignore_index
    if pred_ignore == "background":
        pred = np.where(pred == ignore_index, 0, pred)
    elif pred_ignore == "exclude":
        keep &= pred != ignore_index
    else:
        raise ValueError(f"pred_ignore must be 'background' or 'exclude', not {pred_ignore!r}")
    gt, pred = gt[keep], pred[keep]
    if gt.size and (gt.max() >= num_classes or pred.max() >= num_classes):
        raise ValueError(f"label value outside 0..{num_classes - 1}")
    return np.bincount(gt * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def scores(conf: np.ndarray) -> dict:
    """Per-class IoU, mIoU (nanmean), pixel accuracy, and IRN's FP/FN ratios."""
    conf = conf.astype(np.float64)
    tp = np.diag(conf)
    gt_total, pred_total = conf.sum(1), conf.sum(0)
    union = gt_total + pred_total - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = tp / union
        fp = 1 - gt_total / union  # share of the union predicted but not GT
        fn = 1 - pred_total / union
    return {
        "miou": float(np.nanmean(iou)), "iou": iou.tolist(),
        "pixel_accuracy": float(tp.sum() / max(conf.sum(), 1)),
        "fp_bg": float(fp[0]), "fn_bg": float(fn[0]),
        "fp_fg": float(np.nanmean(fp[1:])), "fn_fg": float(np.nanmean(fn[1:])),
    }


def segmentation_scores(conf: np.ndarray) -> dict:
    """deeplab-pytorch's ``scores()``: pixel and mean accuracy, per-class IoU, mIoU over the classes present
    in the GT (a class only predicted is left out, not counted as 0), frequency-weighted IoU."""
    conf = conf.astype(np.float64)
    tp, gt_total, pred_total = np.diag(conf), conf.sum(1), conf.sum(0)
    present = gt_total > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = tp / (gt_total + pred_total - tp)
        accuracy = tp / gt_total
    iou_present = np.where(present, iou, np.nan)
    freq = gt_total / max(conf.sum(), 1)
    return {
        "miou": float(np.nanmean(iou_present)) if present.any() else float("nan"),
        "iou": iou_present.tolist(),
        "pixel_accuracy": float(tp.sum() / max(conf.sum(), 1)),
        "mean_accuracy": float(np.nanmean(accuracy)) if present.any() else float("nan"),
        "fwiou": float(np.nansum(freq[present] * iou[present])),
    }


def with_background(high_res: np.ndarray, threshold: float) -> np.ndarray:
    """CAM planes behind a constant background plane (IRN's labelling scores)."""
    return np.concatenate([np.full((1, *high_res.shape[1:]), threshold, high_res.dtype), high_res])


def cam_prediction(high_res: np.ndarray, keys: Sequence[int], threshold: float) -> np.ndarray:
    """IRN's CAM labelling: a constant background plane, argmax (background wins ties), map to classes."""
    planes = with_background(high_res, threshold)
    lookup = np.asarray([0, *keys], np.uint8)
    return lookup[planes.argmax(0)]


class ThresholdSweep:
    """Accumulates the CAM confusion matrix for every background threshold at once."""

    def __init__(self, thresholds: Sequence[float], num_classes: int, ignore_index: int = 255):
        self.thresholds = np.asarray(thresholds, np.float64)
        if np.any(np.diff(self.thresholds) <= 0):
            raise ValueError("thresholds must be increasing")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        k = len(self.thresholds)
        self.hist = np.zeros((num_classes, num_classes, k + 1), np.int64)

    def add(self, high_res: np.ndarray, keys: Sequence[int], gt: np.ndarray) -> None:
        if high_res.shape[1:] != gt.shape:
            raise ValueError(f"CAM size {high_res.shape[1:]} differs from GT size {gt.shape}")
        if len(keys) == 0:
            best_cls = np.zeros(gt.shape, np.int64)
            best = np.full(gt.shape, -np.inf)
        else:
            lookup = np.asarray(keys, np.int64)
            best_cls = lookup[high_res.argmax(0)]
            best = high_res.max(0).astype(np.float64)
        # Number of thresholds strictly below the score = thresholds at which the pixel is foreground.
        n_fg = np.searchsorted(self.thresholds, best.reshape(-1), side="left")
        g = gt.reshape(-1).astype(np.int64)
        keep = g != self.ignore_index
        c, k = self.num_classes, len(self.thresholds) + 1
        flat = (g[keep] * c + best_cls.reshape(-1)[keep]) * k + n_fg[keep]
        self.hist += np.bincount(flat, minlength=c * c * k).reshape(c, c, k)

    def confusions(self) -> np.ndarray:
        """(n_thresholds, C, C) confusion matrices."""
        # fg_at[t] = pixels whose n_fg > t, i.e. still foreground at threshold index t.
        tail = np.cumsum(self.hist[:, :, ::-1], axis=2)[:, :, ::-1]  # tail[..., j] = sum over n_fg >= j
        out = np.zeros((len(self.thresholds), self.num_classes, self.num_classes), np.int64)
        for t in range(len(self.thresholds)):
            fg = tail[:, :, t + 1]
            bg = self.hist.sum(2) - fg
            conf = fg.copy()
            conf[:, 0] += bg.sum(1)  # background predictions land in column 0
            out[t] = conf
        return out

    def curve(self) -> list[dict]:
        return [{"threshold": float(t), **{k: v for k, v in scores(c).items() if k != "iou"}}
                for t, c in zip(self.thresholds, self.confusions())]


def sweep_thresholds(start: float, stop: float, step: float) -> np.ndarray:
    n = round((stop - start) / step) + 1
    return np.round(start + step * np.arange(n), 10)


def plot_curve(curve: list[dict], chosen: float, out_path: str | os.PathLike, title: str) -> None:
    """mIoU against background threshold, with the configured threshold marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from data.io import atomic_path

    t = [row["threshold"] for row in curve]
    m = [100 * row["miou"] for row in curve]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(t, m, color="#1f77b4")
    best = int(np.argmax(m))
    ax.axvline(chosen, color="#888", ls="--", lw=1, label=f"configured {chosen:.2f}")
    ax.scatter([t[best]], [m[best]], color="#d62728", zorder=3,
               label=f"best {m[best]:.1f} at {t[best]:.2f} (GT-tuned)")
    ax.set_xlabel("background threshold")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format=Path(out_path).suffix.lstrip(".") or "png")
    plt.close(fig)

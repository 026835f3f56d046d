"""Evaluate CAMs (IRN's ``eval_cam``, plus the background-threshold curve)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from data.dense import DenseMapReader
from data.io import BadInputError, write_csv, write_json
from data.manifest import Manifest
from stages.config import EvalCAMConfig, validate
from stages.metrics import ThresholdSweep, plot_curve, scores, sweep_thresholds


def evaluate_cams(cfg: EvalCAMConfig, manifest: Manifest, store: DenseMapReader, out_dir: Path,
                  progress: Callable[[float, str], None] | None = None) -> dict:
    """Write metrics.json, curve.csv and curve.png into ``out_dir``; return the headline metrics."""
    validate(cfg)
    thresholds = sweep_thresholds(*cfg.sweep)
    # The configured threshold is always on the curve, so its mIoU is exact, not interpolated.
    thresholds = np.unique(np.concatenate([thresholds, [cfg.bg_threshold]]))
    space = manifest.label_space
    sweep = ThresholdSweep(thresholds, space.num_classes, space.ignore_index)
    layout = manifest.layout
    ids = manifest.splits["eval"]
    for n, image_id in enumerate(ids, start=1):
        if image_id not in store:
            raise BadInputError(store.paths[0].parent, f"CAMs missing for image {image_id!r}")
        arrays, attrs = store.read(image_id, ["high_res"])
        gt = layout.read_label(image_id, evaluation=True)
        sweep.add(arrays["high_res"], attrs["keys"].tolist(), gt)
        if progress and (n % 50 == 0 or n == len(ids)):
            progress(100.0 * n / len(ids), f"scored {n}/{len(ids)} images")
    confusions = sweep.confusions()
    chosen = int(np.flatnonzero(np.isclose(thresholds, cfg.bg_threshold))[0])
    at_chosen = scores(confusions[chosen])
    curve = sweep.curve()
    best = int(np.argmax([row["miou"] for row in curve]))
    per_class = dict(zip(space.names, at_chosen["iou"]))
    metrics = {
        "miou": at_chosen["miou"], "threshold": cfg.bg_threshold, "per_class_iou": per_class,
        "pixel_accuracy": at_chosen["pixel_accuracy"], "fp_fg": at_chosen["fp_fg"], "fn_fg": at_chosen["fn_fg"],
        "best_miou": curve[best]["miou"], "best_threshold": curve[best]["threshold"],
        "n_images": len(ids), "pred_ignore": cfg.pred_ignore,
        "protocol": "dataset-level confusion, background included, GT 255 ignored, nanmean over classes",
    }
    write_json(out_dir / "metrics.json", metrics)
    write_csv(out_dir / "curve.csv", curve)
    plot_curve(curve, cfg.bg_threshold, out_dir / "curve.png", f"CAM mIoU vs background threshold ({len(ids)} images)")
    return {k: metrics[k] for k in ("miou", "threshold", "best_miou", "best_threshold", "n_images")}

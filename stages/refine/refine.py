"""RefineCRF: the dense CRF over the propagated pseudo labels (one preset of ``stages.refine.crf.CRF_PRESETS``).

Propagation scores are not probabilities (IRN's walk is max-normalised behind a constant background
plane, PSA's is not normalised at all), so each pixel's scores are divided by their sum first: the CRF's
unary is then -log of a distribution, as in WSGCN's and A2GNN's final CRF.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from data.artifacts import label_file
from data.dense import DenseMapReader
from data.io import BadInputError, write_label_png
from data.manifest import Manifest
from stages.config import RefineCRFConfig, validate


def scores_to_probs(scores: np.ndarray) -> np.ndarray:
    """Per-pixel normalisation of non-negative scores; a pixel scoring 0 everywhere becomes uniform."""
    scores = np.clip(scores.astype(np.float32), 0.0, None)
    total = scores.sum(0, keepdims=True)
    uniform = np.full_like(scores, 1.0 / max(scores.shape[0], 1))
    return np.where(total > 0, scores / np.maximum(total, 1e-12), uniform)


def refine_labels(rgb: np.ndarray, scores: np.ndarray, preset: str, device: torch.device | None = None) -> np.ndarray:
    """Refined label indices (H, W) into the score planes, with the CRF ``preset``."""
    from stages.refine.crf import refine

    return refine(rgb, scores_to_probs(scores), preset, device=device)


def refine_pseudo_labels(cfg: RefineCRFConfig, manifest: Manifest, ids: Sequence[str], scores: DenseMapReader,
                         out_dir: Path, device: torch.device | None = None,
                         progress: Callable[[float, str], None] | None = None) -> dict:
    """``labels/<id>.png`` for ``ids`` from Propagate's ``probs`` (background first) and class keys."""
    validate(cfg)
    space = manifest.label_space
    changed, total = 0, 0
    for n, image_id in enumerate(ids, start=1):
        if image_id not in scores:
            raise BadInputError(scores.paths[0].parent, f"propagated scores missing for image {image_id!r}")
        arrays, attrs = scores.read(image_id, ["probs"])
        probs, keys = arrays["probs"], [int(k) for k in attrs["keys"]]
        rgb = manifest.layout.read_image(image_id)
        if probs.shape != (len(keys) + 1, *rgb.shape[:2]):
            raise BadInputError(scores.index[image_id], f"image {image_id!r}: scores {probs.shape} do not match "
                                f"{len(keys)} classes + background at image size {rgb.shape[:2]}")
        lookup = np.asarray([0, *keys], np.uint8)
        before = lookup[probs.argmax(0)]
        after = lookup[refine_labels(rgb, probs, cfg.preset, device)]
        changed += int((before != after).sum())
        total += before.size
        path = label_file(out_dir, image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_label_png(path, after, space.palette)
        if progress and (n % 20 == 0 or n == len(ids)):
            progress(100.0 * n / len(ids), f"{n}/{len(ids)} images")
    return {"changed_pixels": changed, "pixels": total}

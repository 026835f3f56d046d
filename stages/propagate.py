"""Pseudo labels by propagating CAMs over learned affinities (registry: ``PROPAGATION_METHODS``).

A method takes one image's CAMs and the affinity net's output for it and returns class scores
(background first, then the image's classes) plus the argmax. Images whose seeds are all "ignore" got no
supervision from the affinity net's point of view; by default they keep their CAM label instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from data.dense import DenseMapReader, DenseMapWriter
from data.io import read_label_png, write_label_png
from data.manifest import Manifest
from models.registry import Registry
from stages.config import PropagateConfig
from stages.evaluate import with_background
from stages.extract_seeds import label_file, read_cam
from stages.gcn import propagate_gcn, validate_gcn_config
from stages.random_walk import propagate_irn, propagate_psa

PROPAGATION_METHODS: Registry = Registry("propagation method")

# Which affinity net produces what each method walks on.
REQUIRED_AFFINITY = {"rw_irn": "irnet", "rw_psa": "affinitynet", "gcn": "irnet"}
# Methods that also read IRNet's "boundary_features", the image ("rgb", uint8 (H, W, 3)), its "image_id" and the
# label space's class count ("num_labels") from the affinity dict.
IMAGE_INPUT_METHODS = {"gcn"}


@PROPAGATION_METHODS.register("rw_irn")
def rw_irn(cfg: PropagateConfig, cams: dict[str, np.ndarray], affinity: dict[str, np.ndarray],
           size: tuple[int, int], device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """IRN: stride-4 CAM x (1 - B) walked over boundary affinities; constant background after."""
    return propagate_irn(cams["cam"], affinity["boundary"], size, beta=cfg.beta, steps=cfg.steps,
                         radius=cfg.radius, bg_threshold=cfg.bg_threshold, device=device)


@PROPAGATION_METHODS.register("rw_psa")
def rw_psa(cfg: PropagateConfig, cams: dict[str, np.ndarray], affinity: dict[str, np.ndarray],
           size: tuple[int, int], device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """PSA/SEAM: background (1 - max)^alpha propagated with the classes over feature affinities."""
    return propagate_psa(cams["high_res"], affinity["features"], alpha=cfg.alpha, beta=cfg.beta,
                         steps=cfg.steps, radius=cfg.radius, device=device)


@PROPAGATION_METHODS.register("gcn")
def gcn(cfg: PropagateConfig, cams: dict[str, np.ndarray], affinity: dict[str, np.ndarray],
        size: tuple[int, int], device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """WSGCN-I: a GCN per image on rownorm(max(T^t, T^t^T) + I), trained on CRF/CAM partial labels."""
    missing = {"boundary", "boundary_features", "rgb", "image_id"} - set(affinity)
    if missing:
        raise ValueError(f"propagation gcn needs {', '.join(sorted(missing))} in its inputs (IRNet's boundary "
                         "features and the image, as propagate_images passes them)")
    num_labels = int(affinity["num_labels"]) if "num_labels" in affinity else None
    return propagate_gcn(cfg, cams["cam"], cams["high_res"], affinity["boundary"], affinity["boundary_features"],
                         affinity["rgb"], str(affinity["image_id"]), size, device, entropy_classes=num_labels)


def validate_propagation(cfg: PropagateConfig, affinity_method: str | None = None) -> None:
    PROPAGATION_METHODS.get(cfg.propagation, key="Propagate.propagation")
    if cfg.beta <= 0 or cfg.alpha <= 0:
        raise ValueError(f"Propagate.beta and Propagate.alpha must be > 0, got {cfg.beta} and {cfg.alpha}")
    if cfg.steps < 1 or cfg.radius < 2 or cfg.shard_size < 1:
        raise ValueError("Propagate.steps >= 1, Propagate.radius >= 2 and Propagate.shard_size >= 1 are required")
    if not 0 <= cfg.bg_threshold <= 1 or not 0 <= cfg.cam_bg_threshold <= 1:
        raise ValueError("Propagate.bg_threshold and Propagate.cam_bg_threshold must lie in [0, 1]")
    validate_gcn_config(cfg)
    needed = REQUIRED_AFFINITY.get(cfg.propagation)
    if affinity_method and needed and affinity_method != needed:
        raise ValueError(f"Propagate.propagation = {cfg.propagation} walks on {needed}'s output, but "
                         f"TrainAffinity.affinity_method = {affinity_method}")


def propagate_images(cfg: PropagateConfig, manifest: Manifest, ids: Sequence[str], cams: DenseMapReader,
                     seeds_dir: Path, affinity_model: torch.nn.Module, out_dir: Path, writer: DenseMapWriter,
                     device: torch.device, progress: Callable[[float, str], None] | None = None) -> dict:
    """Pseudo labels ``labels/<id>.png`` and class scores ``probs`` (background first) for ``ids``."""
    from stages.affinity import infer_affinity_input

    validate_propagation(cfg)
    method = PROPAGATION_METHODS.get(cfg.propagation)
    layout, space = manifest.layout, manifest.label_space
    fallback = []
    for n, image_id in enumerate(ids, start=1):
        rgb = layout.read_image(image_id)
        size = rgb.shape[:2]
        high, keys = read_cam(cams, image_id, "high_res", size)
        seeds = read_label_png(label_file(seeds_dir, image_id), space)
        if cfg.empty_seeds == "cam" and np.all(seeds == space.ignore_index):
            probs = with_background(high, cfg.cam_bg_threshold)  # the CAM label's own scores
            index = probs.argmax(0)
            fallback.append(image_id)
        else:
            low, _ = read_cam(cams, image_id, "cam", size)
            with_image = cfg.propagation in IMAGE_INPUT_METHODS
            with torch.no_grad():
                affinity = infer_affinity_input(affinity_model, rgb, device, boundary_features=with_image)
            if with_image:
                affinity.update(rgb=rgb, image_id=np.asarray(image_id), num_labels=np.asarray(space.num_classes))
            probs, index = method(cfg, {"cam": low, "high_res": high}, affinity, size, device)
        label = np.asarray([0, *keys], np.uint8)[index]
        path = label_file(out_dir, image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_label_png(path, label, space.palette)
        writer.write(image_id, {"probs": probs}, {"keys": np.asarray(keys, np.int32)})
        if progress and (n % 20 == 0 or n == len(ids)):
            progress(100.0 * n / len(ids), f"{n}/{len(ids)} images")
    return {"cam_fallback_images": fallback}

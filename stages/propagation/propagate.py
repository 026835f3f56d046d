"""The propagation step: pseudo labels ``labels/<id>.png`` and class scores for a shard of images.

The chosen method (``Propagate.propagation``, a record of :data:`stages.propagation.PROPAGATION_METHODS`) takes one
image's CAMs and what its trained net gives for the image and returns class scores (background first, then the
image's classes) plus the argmax. Images whose seeds are all "ignore" got no supervision from the net's point of
view; by default they keep their CAM label instead. Only the chosen method's module is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from data.artifacts import label_file
from data.dense import DenseMapReader, DenseMapWriter, read_cam
from data.io import read_label_png, write_label_png
from data.manifest import Manifest
from stages.config import PropagateConfig
from stages.metrics import with_background
from stages.propagation import PROPAGATION_METHODS
from stages.propagation.method import AFFINITY_NET, SEED_NET, PropagationMethod


def propagation_method(name: str) -> PropagationMethod:
    """The record of method ``name`` (imports its module only)."""
    return PROPAGATION_METHODS.get(name, key="Propagate.propagation")


def validate_propagation(cfg: PropagateConfig, affinity_method: str | None = None,
                         seed_net_method: str | None = None) -> None:
    """Reject a configuration no run can use, naming the key; with the trained net's method, check it is the one
    the chosen propagation reads."""
    method = propagation_method(cfg.propagation)
    if cfg.beta <= 0 or cfg.alpha <= 0:
        raise ValueError(f"Propagate.beta and Propagate.alpha must be > 0, got {cfg.beta} and {cfg.alpha}")
    if cfg.steps < 1 or cfg.radius < 2 or cfg.shard_size < 1:
        raise ValueError("Propagate.steps >= 1, Propagate.radius >= 2 and Propagate.shard_size >= 1 are required")
    if not 0 <= cfg.bg_threshold <= 1 or not 0 <= cfg.cam_bg_threshold <= 1:
        raise ValueError("Propagate.bg_threshold and Propagate.cam_bg_threshold must lie in [0, 1]")
    if method.validate:
        method.validate(cfg)
    if affinity_method and method.trained_by == AFFINITY_NET and affinity_method != method.affinity_method:
        raise ValueError(f"Propagate.propagation = {cfg.propagation} walks on {method.affinity_method}'s output, but "
                         f"TrainAffinity.affinity_method = {affinity_method}")
    if seed_net_method and method.trained_by == SEED_NET and seed_net_method != cfg.propagation:
        raise ValueError(f"Propagate.propagation = {cfg.propagation} predicts with the net TrainSeedNet trains, but "
                         f"TrainSeedNet.method = {seed_net_method}; set both to the same method")


ModelInputs = Callable[[np.ndarray, Sequence[int]], dict]


def propagate_images(cfg: PropagateConfig, manifest: Manifest, ids: Sequence[str], cams: DenseMapReader,
                     seeds_dir: Path, model_inputs: ModelInputs, out_dir: Path, writer: DenseMapWriter,
                     device: torch.device, progress: Callable[[float, str], None] | None = None,
                     supervision: str = "image") -> dict:
    """Pseudo labels ``labels/<id>.png`` and class scores ``probs`` (background first) for ``ids``.

    ``model_inputs(rgb, keys)`` runs the trained net the method needs
    (:func:`stages.affinity.train.affinity_net_inputs`, :func:`stages.seed_net.train.seed_net_inputs`);
    ``supervision`` is the seeds' (ExtractSeeds.supervision): box supervision also
    hands the image's boxes to the methods that use them.
    """
    validate_propagation(cfg)
    method = propagation_method(cfg.propagation)
    batched = method.run_batch
    batch_size = method.batch_size(cfg)
    layout, space = manifest.layout, manifest.label_space
    fallback = []
    written = 0
    # Images in input order: (id, keys, (probs, index) or None, the batched method's (cams, inputs, size) or None).
    pending: list[tuple[str, list[int], tuple | None, tuple | None]] = []

    def write(image_id: str, keys: list[int], probs: np.ndarray, index: np.ndarray) -> None:
        nonlocal written
        label = np.asarray([0, *keys], np.uint8)[index]
        path = label_file(out_dir, image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_label_png(path, label, space.palette)
        writer.write(image_id, {"probs": probs}, {"keys": np.asarray(keys, np.int32)})
        written += 1
        if progress and (written % 20 == 0 or written == len(ids)):
            progress(100.0 * written / len(ids), f"{written}/{len(ids)} images")

    def flush() -> None:
        """Run the batched method on the pending images that need it, then write all pending in order."""
        arguments = [args for *_, args in pending if args is not None]
        computed = iter(batched(cfg, arguments, device) if arguments else [])
        for image_id, keys, result, args in pending:
            write(image_id, keys, *(result if args is None else next(computed)))
        pending.clear()

    for image_id in ids:
        rgb = layout.read_image(image_id)
        size = rgb.shape[:2]
        high, keys = read_cam(cams, image_id, "high_res", size)
        seeds = read_label_png(label_file(seeds_dir, image_id), space)
        result = args = None
        if cfg.empty_seeds == "cam" and np.all(seeds == space.ignore_index):
            probs = with_background(high, cfg.cam_bg_threshold)  # the CAM label's own scores
            result = probs, probs.argmax(0)
            fallback.append(image_id)
        else:
            low, _ = read_cam(cams, image_id, "cam", size)
            inputs = model_inputs(rgb, keys)
            if method.inputs.image:
                boxes = layout.read_boxes(image_id, size) if supervision == "box" else np.zeros((0, 5), np.int64)
                inputs.update(rgb=rgb, image_id=np.asarray(image_id), num_labels=np.asarray(space.num_classes),
                              seeds=seeds, keys=np.asarray(keys, np.int64), supervision=np.asarray(supervision),
                              boxes=boxes)
            args = ({"cam": low, "high_res": high}, inputs, size)
            if batched is None:
                result, args = method.run(cfg, *args, device), None
        pending.append((image_id, keys, result, args))
        if len(pending) >= batch_size:
            flush()
    flush()
    return {"cam_fallback_images": fallback}

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
from stages.a2gnn import A2GNN_INPUTS, propagate_a2gnn, propagate_a2gnn_many, validate_a2gnn_config
from stages.config import REQUIRED_AFFINITY, SEED_NET_PROPAGATIONS, PropagateConfig, TrainSeedNetConfig
from stages.evaluate import with_background
from stages.extract_seeds import label_file, read_cam
from stages.gcn import propagate_gcn, validate_gcn_config
from stages.random_walk import propagate_irn, propagate_psa

PROPAGATION_METHODS: Registry = Registry("propagation method")

# Methods that also read IRNet's "boundary_features", the image ("rgb", uint8 (H, W, 3)), its "image_id" and the
# label space's class count ("num_labels") from the affinity dict.
IMAGE_INPUT_METHODS = {"gcn", "a2gnn"}


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


def _a2gnn_arguments(cams: dict[str, np.ndarray], affinity: dict[str, np.ndarray], size: tuple[int, int]) -> dict:
    """propagate_a2gnn's per-image keyword arguments from the method's inputs."""
    missing = set(A2GNN_INPUTS) - set(affinity)
    if missing:
        raise ValueError(f"propagation a2gnn needs {', '.join(sorted(missing))} in its inputs (the a2gnn affinity "
                         "net's window graph, the image, its seeds and class keys, as propagate_images passes them)")
    stride = affinity.get("affinity_stride")
    return {"high_res": cams["high_res"], "window_affinity": affinity["window_affinity"],
            "node_features": affinity["node_features"], "rgb": affinity["rgb"], "seeds": affinity["seeds"],
            "keys": affinity["keys"], "image_id": str(affinity["image_id"]), "size": size,
            "supervision": str(affinity.get("supervision", "image")), "boxes": affinity.get("boxes"),
            "stride": None if stride is None else int(stride)}


@PROPAGATION_METHODS.register("a2gnn")
def a2gnn(cfg: PropagateConfig, cams: dict[str, np.ndarray], affinity: dict[str, np.ndarray],
          size: tuple[int, int], device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """A2GNN: a fresh affinity-attention GNN per image on the a2gnn net's window graph, trained on the seeds
    (stages/a2gnn.py). Reads "seeds" (label ids), "keys", "supervision" and "boxes" from ``affinity`` too."""
    return propagate_a2gnn(cfg, **_a2gnn_arguments(cams, affinity, size), device=device)


def a2gnn_many(cfg: PropagateConfig, batch: Sequence[tuple[dict, dict, tuple[int, int]]],
               device: torch.device) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`a2gnn` on a batch of (cams, inputs, size): images of one grid size train their GNNs together."""
    return propagate_a2gnn_many(cfg, [_a2gnn_arguments(*args) for args in batch], device)


# Methods that can also run on a batch of images, fn(cfg, [(cams, inputs, size), ...], device) -> [(probs, index)],
# with the per-image method's results; propagate_images hands them up to Propagate.a2gnn_batch_images at a time.
BATCHED_METHODS: dict[str, Callable[..., list[tuple[np.ndarray, np.ndarray]]]] = {"a2gnn": a2gnn_many}


def _seed_net_prediction(cfg: PropagateConfig, cams: dict[str, np.ndarray], inputs: dict[str, np.ndarray],
                         size: tuple[int, int], device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    probs = inputs["probs"]
    if probs.shape[1:] != tuple(size) or probs.shape[0] != cams["high_res"].shape[0] + 1:
        raise ValueError(f"seed net probabilities {probs.shape} do not match the image's background + "
                         f"{cams['high_res'].shape[0]} classes at {tuple(size)}")
    return probs, probs.argmax(0)


# DGCN's graph cut and DSRG's region growing regrow the seeds while a segmentation net trains (TrainSeedNet); its
# predictions are the pseudo labels.
for _name in SEED_NET_PROPAGATIONS:
    PROPAGATION_METHODS.register(_name)(_seed_net_prediction)


def validate_propagation(cfg: PropagateConfig, affinity_method: str | None = None,
                         seed_net_method: str | None = None) -> None:
    PROPAGATION_METHODS.get(cfg.propagation, key="Propagate.propagation")
    if cfg.beta <= 0 or cfg.alpha <= 0:
        raise ValueError(f"Propagate.beta and Propagate.alpha must be > 0, got {cfg.beta} and {cfg.alpha}")
    if cfg.steps < 1 or cfg.radius < 2 or cfg.shard_size < 1:
        raise ValueError("Propagate.steps >= 1, Propagate.radius >= 2 and Propagate.shard_size >= 1 are required")
    if not 0 <= cfg.bg_threshold <= 1 or not 0 <= cfg.cam_bg_threshold <= 1:
        raise ValueError("Propagate.bg_threshold and Propagate.cam_bg_threshold must lie in [0, 1]")
    validate_gcn_config(cfg)
    validate_a2gnn_config(cfg)
    needed = REQUIRED_AFFINITY.get(cfg.propagation)
    if affinity_method and needed and affinity_method != needed:
        raise ValueError(f"Propagate.propagation = {cfg.propagation} walks on {needed}'s output, but "
                         f"TrainAffinity.affinity_method = {affinity_method}")
    if seed_net_method and cfg.propagation in SEED_NET_PROPAGATIONS and seed_net_method != cfg.propagation:
        raise ValueError(f"Propagate.propagation = {cfg.propagation} predicts with the net TrainSeedNet trains, but "
                         f"TrainSeedNet.method = {seed_net_method}; set both to the same method")


ModelInputs = Callable[[np.ndarray, Sequence[int]], dict]


def affinity_net_inputs(model: torch.nn.Module, device: torch.device, propagation: str) -> ModelInputs:
    """``inputs(rgb, keys)``: what ``propagation`` reads from an affinity net (boundary, features, window graph)."""
    from stages.affinity import infer_affinity_input

    def inputs(rgb: np.ndarray, keys: Sequence[int]) -> dict:
        with torch.no_grad():
            return infer_affinity_input(model, rgb, device, boundary_features=propagation in IMAGE_INPUT_METHODS)
    return inputs


def seed_net_inputs(cfg: TrainSeedNetConfig, model: torch.nn.Module, device: torch.device) -> ModelInputs:
    """``inputs(rgb, keys)``: a seed-trained net's multi-scale class probabilities (``dsrg`` / ``graphcut``)."""
    from stages.seed_training import predict_seed_net

    def inputs(rgb: np.ndarray, keys: Sequence[int]) -> dict:
        return {"probs": predict_seed_net(cfg, model, rgb, keys, device)}
    return inputs


def propagate_images(cfg: PropagateConfig, manifest: Manifest, ids: Sequence[str], cams: DenseMapReader,
                     seeds_dir: Path, model_inputs: ModelInputs, out_dir: Path, writer: DenseMapWriter,
                     device: torch.device, progress: Callable[[float, str], None] | None = None,
                     supervision: str = "image") -> dict:
    """Pseudo labels ``labels/<id>.png`` and class scores ``probs`` (background first) for ``ids``.

    ``model_inputs(rgb, keys)`` runs the trained net the method needs (:func:`affinity_net_inputs`,
    :func:`seed_net_inputs`); ``supervision`` is the seeds' (ExtractSeeds.supervision): box supervision also
    hands the image's boxes to the methods that use them.
    """
    validate_propagation(cfg)
    method = PROPAGATION_METHODS.get(cfg.propagation)
    batched = BATCHED_METHODS.get(cfg.propagation)
    batch_size = cfg.a2gnn_batch_images if batched else 1
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
            if cfg.propagation in IMAGE_INPUT_METHODS:
                boxes = layout.read_boxes(image_id, size) if supervision == "box" else np.zeros((0, 5), np.int64)
                inputs.update(rgb=rgb, image_id=np.asarray(image_id), num_labels=np.asarray(space.num_classes),
                              seeds=seeds, keys=np.asarray(keys, np.int64), supervision=np.asarray(supervision),
                              boxes=boxes)
            args = ({"cam": low, "high_res": high}, inputs, size)
            if batched is None:
                result, args = method(cfg, *args, device), None
        pending.append((image_id, keys, result, args))
        if len(pending) >= batch_size:
            flush()
    flush()
    return {"cam_fallback_images": fallback}

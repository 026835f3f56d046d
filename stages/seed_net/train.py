"""DSRG / DGCN: a segmentation net trained from sparse seeds while its supervision is regrown every iteration.

Per iteration, on the network's output grid (41x41 for a 321 crop at output stride 8):

1. a batch of crops (the DeepLab augmentation of :mod:`stages.segmentation.train`: discrete random scale, pad, crop,
   flip), each with its seed map carried along (nearest) and then nearest-sampled to the logits' grid;
2. the logits (and, for DGCN, the 1,280-d node features of :meth:`DeepLabV2.forward_with_features`);
3. new supervision grown from the **original** seeds: ``dsrg`` = CRF + seeded region growing
   (:func:`stages.seed_net.growing.dsrg_step`), ``graphcut`` = one s-t cut per present class on a kNN feature graph
   (:func:`stages.seed_net.graphcut.dgcn_step`); the image's classes are background + its image-level labels;
4. loss = balanced seed loss on the new supervision + SEC's constrain-to-boundary loss; SGD.

Recipe (hustvl/DGCN ``train.py``; DSRG ``solver-s.prototxt`` where noted in stages.config.TrainSeedNetConfig):
SGD momentum 0.9, weight decay 5e-4, backbone 1x, head 10x; linear warm-up with factor (t + 1) / T at 0-based
iteration t (DGCN's ``lr_step``: base_lr / 200 * (i_iter + 1)), then x0.3 every 3 epochs ("step") or poly.
DGCN's network is ``head = dilated12`` (one dilation-12 classifier) with ``bn_mode = batch_stats`` (BN affine
frozen, batch statistics in training); the defaults are DeepLab-v2's ASPP 6/12/18/24 summed (DSRG) and BN on
its pretrained statistics. Deviation, documented: images normalised with the ImageNet mean and std (DGCN swaps
the R and B means).

The data order and every augmentation draw are keyed by (seed, epoch, image), the label updates are
deterministic, and the optimiser state is checkpointed, so a resumed run ends with the same weights.

The net's predictions (:func:`predict_seed_net`: logits summed over scales 0.75/1/1.25, restricted to background
and the image's classes, softmax; DGCN ``make_pred`` without its CRF) become the pseudo labels.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from data.artifacts import MODEL_WEIGHTS, TRAINING_LOG
from data.io import atomic_path, write_csv
from data.labelspace import IGNORE_INDEX
from data.manifest import Manifest
from data.transforms import IMAGENET_MEAN, IMAGENET_STD
from stages.config import TrainSeedNetConfig, validate
from stages.runtime import seed_everything
from stages.seed_net.graphcut import DGCNConfig, dgcn_step, make_pool
from stages.seed_net.growing import DSRGConfig, dsrg_step
from stages.segmentation.model import load_matching, predict_probs
from stages.segmentation.train import augment, batch_schedule, nearest_resize
from stages.training.engine import TrainingLoop
from stages.training.optim import make_optimizer

SeedSource = Callable[[str], np.ndarray]
# TrainSeedNet.head -> deeplabv2's dilation rates (None = the model's own ASPP).
HEAD_RATES: dict[str, tuple[int, ...] | None] = {"aspp": None, "dilated12": (12,)}
BN_MODES = ("frozen", "batch_stats")
ProgressFn = Callable[[float, str], None]



# ----------------------------------------------------------------------------------------------------------------
# Configuration


def validate_seed_net(cfg: TrainSeedNetConfig) -> None:
    """Reject a TrainSeedNet configuration the loop cannot use, naming the key (called by stages.config.validate)."""
    from models.resnet import BACKBONES
    from models.segmenters import SEGMENTERS

    SEGMENTERS.get(cfg.model, key="TrainSeedNet.model")
    BACKBONES.get(cfg.backbone, key="TrainSeedNet.backbone")
    if cfg.method == "graphcut" and cfg.model != "deeplabv2":
        raise ValueError(f"TrainSeedNet.model = {cfg.model!r}: method graphcut needs deeplabv2 (its node features "
                         "are layer1 + layer3 on the logits' grid at output stride 8)")
    positive = {"iterations": cfg.iterations, "batch_size": cfg.batch_size, "lr": cfg.lr,
                "checkpoint_every": cfg.checkpoint_every, "step_epochs": cfg.step_epochs, "dgcn_k": cfg.dgcn_k,
                "crf_iterations": cfg.crf_iterations, "dgcn_seed_capacity": cfg.dgcn_seed_capacity}
    for key, value in positive.items():
        if not value > 0:
            raise ValueError(f"TrainSeedNet.{key} must be positive, got {value}")
    if cfg.crop_size < 16:
        raise ValueError(f"TrainSeedNet.crop_size must be at least 16, got {cfg.crop_size}")
    if cfg.warmup_iterations < 0 or cfg.step_iterations < 0:
        raise ValueError("TrainSeedNet.warmup_iterations and step_iterations must be >= 0")
    if not 0 < cfg.step_gamma <= 1:
        raise ValueError(f"TrainSeedNet.step_gamma must lie in (0, 1], got {cfg.step_gamma}")
    for key in ("dsrg_bg_threshold", "dsrg_fg_threshold", "dgcn_update_threshold"):
        if not 0 <= getattr(cfg, key) < 1:
            raise ValueError(f"TrainSeedNet.{key} must lie in [0, 1), got {getattr(cfg, key)}")
    if cfg.dsrg_connectivity not in (4, 8):
        raise ValueError(f"TrainSeedNet.dsrg_connectivity must be 4 or 8, got {cfg.dsrg_connectivity}")
    for key in ("scales", "predict_scales"):
        scales = getattr(cfg, key)
        if not scales or min(scales) <= 0:
            raise ValueError(f"TrainSeedNet.{key} must be non-empty and positive, got {scales}")
    if len(cfg.crf_gaussian) != 2 or len(cfg.crf_bilateral) != 3:
        raise ValueError("TrainSeedNet.crf_gaussian is (sxy, compat) and crf_bilateral (sxy, srgb, compat)")
    if cfg.head not in HEAD_RATES:
        raise ValueError(f"TrainSeedNet.head = {cfg.head!r}; choose one of {', '.join(HEAD_RATES)}")
    if cfg.head != "aspp" and cfg.model != "deeplabv2":
        raise ValueError(f"TrainSeedNet.head = {cfg.head!r} replaces deeplabv2's ASPP; model is {cfg.model!r}")
    if cfg.bn_mode not in BN_MODES:
        raise ValueError(f"TrainSeedNet.bn_mode = {cfg.bn_mode!r}; choose one of {', '.join(BN_MODES)}")
    if cfg.bn_mode == "batch_stats" and not cfg.freeze_bn:
        raise ValueError("TrainSeedNet.bn_mode = batch_stats keeps the BN affine parameters frozen: it needs "
                         "freeze_bn = true (freeze_bn = false trains BN fully, on batch statistics)")
    if cfg.freeze_bn and cfg.bn_mode == "frozen" and not (cfg.pretrained or cfg.init_checkpoint):
        raise ValueError("TrainSeedNet.freeze_bn keeps random BatchNorm statistics unless TrainSeedNet.pretrained "
                         "or init_checkpoint is set; set one, bn_mode = batch_stats, or freeze_bn = false")


def label_update_config(cfg: TrainSeedNetConfig) -> DSRGConfig | DGCNConfig:
    """The per-iteration update's config: the method's reference config with the knobs of ``cfg`` applied."""
    base = DGCNConfig() if cfg.method == "graphcut" else DSRGConfig()
    crf = dataclasses.replace(base.crf, gaussian=tuple(cfg.crf_gaussian), bilateral=tuple(cfg.crf_bilateral),
                              iterations=cfg.crf_iterations,
                              unary=base.crf.unary if cfg.crf_unary == "auto" else cfg.crf_unary)
    if cfg.method == "graphcut":
        return dataclasses.replace(base, k=cfg.dgcn_k, seed_capacity=cfg.dgcn_seed_capacity,
                                   update_threshold=cfg.dgcn_update_threshold, crf=crf)
    return dataclasses.replace(base, bg_threshold=cfg.dsrg_bg_threshold, fg_threshold=cfg.dsrg_fg_threshold,
                               connectivity=cfg.dsrg_connectivity, crf=crf)


def lr_factor(cfg: TrainSeedNetConfig, iteration: int, per_epoch: int) -> float:
    """LR multiplier at ``iteration`` (0-based): linear warm-up times step (x gamma every step_epochs epochs or
    step_iterations iterations; hustvl/DGCN) or poly decay."""
    warm = min(1.0, (iteration + 1) / cfg.warmup_iterations) if cfg.warmup_iterations else 1.0
    if cfg.schedule == "poly":
        return warm * max(0.0, 1.0 - iteration / cfg.iterations) ** cfg.poly_power
    every = cfg.step_iterations or cfg.step_epochs * per_epoch
    return warm * cfg.step_gamma ** (iteration // every)


def optimizer_groups(model: nn.Module, cfg: TrainSeedNetConfig) -> list[dict]:
    """The segmenter's 1x / 10x / 20x groups; without ``head_bias_20x`` the head's biases join the 10x weights
    with weight decay (hustvl/DGCN: the whole classifier at 10x)."""
    groups = model.param_groups()
    if cfg.head_bias_20x:
        return groups
    merged: list[dict] = []
    for g in groups:
        if g.get("lr_mult") == 20.0:
            g = {"params": g["params"], "lr_mult": 10.0}
        same = next((m for m in merged if m["lr_mult"] == g["lr_mult"] and m.get("decay", True)), None)
        if same is not None:
            same["params"] = [*same["params"], *g["params"]]
        else:
            merged.append(dict(g))
    return merged


# ----------------------------------------------------------------------------------------------------------------
# Data


def present_classes(manifest: Manifest, image_id: str) -> np.ndarray:
    """(C,) bool: background + the image's labels (DSRG and DGCN add background to every image label)."""
    present = np.zeros(manifest.label_space.num_classes, bool)
    present[0] = True
    present[list(manifest.image_labels[image_id])] = True
    return present


def _to_uint8_rgb(x: np.ndarray) -> np.ndarray:
    """Undo the ImageNet normalisation of a (3, h, w) crop: uint8 (h, w, 3) for the CRF; padding becomes the mean
    colour (DGCN pads with 0 after subtracting the mean and adds the mean back for its CRF)."""
    rgb = (x.transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN) * 255.0
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


class SeedCropSet(Dataset):
    """(epoch, index) -> normalised crop (3, c, c), its uint8 RGB (c, c, 3), seeds (c, c) int64 (255 = ignore),
    present classes (C,) bool; every draw keyed by (seed, epoch, index)."""

    def __init__(self, manifest: Manifest, ids: Sequence[str], seed_label: SeedSource, cfg: TrainSeedNetConfig):
        self.manifest, self.ids, self.seed_label, self.cfg = manifest, list(ids), seed_label, cfg

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        image_id = self.ids[index]
        rgb = self.manifest.layout.read_image(image_id)
        seeds = np.asarray(self.seed_label(image_id))
        if seeds.shape != rgb.shape[:2]:
            raise ValueError(f"seeds of image {image_id!r} are {seeds.shape}, the image is {rgb.shape[:2]}")
        present = present_classes(self.manifest, image_id)
        seeded = seeds[seeds != IGNORE_INDEX]
        if seeded.size and (seeded.min() < 0 or seeded.max() >= present.size or not present[seeded].all()):
            bad = sorted(set(np.unique(seeded).tolist()) - set(np.flatnonzero(present).tolist()))
            raise ValueError(f"seeds of image {image_id!r} hold classes {bad} that are neither background nor "
                             f"among its image labels {list(self.manifest.image_labels[image_id])}")
        # augment reads only crop_size and scales, which TrainSeedNetConfig shares with TrainSegmentationConfig
        x, y = augment(rgb, seeds.astype(np.uint8), self.cfg, np.random.default_rng([self.cfg.seed, epoch, index]))
        return (torch.from_numpy(x), torch.from_numpy(_to_uint8_rgb(x)), torch.from_numpy(y.astype(np.int64)),
                torch.from_numpy(present))


# ----------------------------------------------------------------------------------------------------------------
# Model


def build_seed_net(cfg: TrainSeedNetConfig, num_classes: int, pretrained: bool = True) -> nn.Module:
    from models.segmenters import create_segmenter

    model = create_segmenter(cfg.model, cfg.backbone, num_classes,
                             pretrained=cfg.pretrained if pretrained and cfg.pretrained else None,
                             freeze_bn=cfg.freeze_bn, rates=HEAD_RATES[cfg.head],
                             bn_batch_stats=cfg.bn_mode == "batch_stats")
    if pretrained and cfg.init_checkpoint:
        load_matching(model, cfg.init_checkpoint)
    return model


def load_seed_net(cfg: TrainSeedNetConfig, num_classes: int, directory: str | os.PathLike,
                  device: torch.device) -> nn.Module:
    """The trained net from ``directory/model.pt`` (as written by :func:`train_seed_net`), in eval mode."""
    path = Path(directory) / MODEL_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no TrainSeedNet checkpoint")
    model = build_seed_net(cfg, num_classes, pretrained=False)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.to(device).eval()


def predict_seed_net(cfg: TrainSeedNetConfig, model: nn.Module, rgb: np.ndarray, keys: Sequence[int],
                     device: torch.device) -> np.ndarray:
    """Probabilities (1 + K, H, W) float32 of background then the image's classes ``keys`` (1-based label ids):
    logits at ``cfg.predict_scales`` upsampled to the image, summed, restricted to those classes, softmax
    (hustvl/DGCN make_pred without its CRF, which a later stage applies)."""
    keys = [int(k) for k in keys]
    if any(k < 1 for k in keys) or len(set(keys)) != len(keys):
        raise ValueError(f"keys must be distinct 1-based foreground class ids, got {keys}")
    was_training = model.training
    model.eval()
    try:
        probs = predict_probs(model, rgb, device, cfg.predict_scales, flip=False, classes=[0, *keys], fuse="logits")
    finally:
        model.train(was_training)
    return probs.astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Training


def _set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor


def _check_inputs(cfg: TrainSeedNetConfig, manifest: Manifest, ids: list[str], processes: int) -> None:
    validate(cfg)
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    if len(ids) < cfg.batch_size:
        raise ValueError(f"TrainSeedNet: {len(ids)} training images is fewer than batch_size={cfg.batch_size}")
    unknown = [i for i in ids if i not in manifest.image_labels]
    if unknown:
        raise ValueError(f"TrainSeedNet: images without image-level labels in the manifest: {unknown[:5]}")


def train_seed_net(cfg: TrainSeedNetConfig, manifest: Manifest, ids: Sequence[str], seed_label: SeedSource,
                   out_dir: str | os.PathLike, device: torch.device, *, resume_dir: str | os.PathLike | None = None,
                   loader_workers: int = 0, processes: int = 1, progress: ProgressFn | None = None,
                   stop_after: int | None = None) -> dict:
    """Train the seed net on ``ids`` from ``seed_label(id)`` ((H, W) int, 255 = ignore, full resolution);
    writes ``out_dir/model.pt`` (see :func:`load_seed_net`) and ``out_dir/log.csv`` (one row per iteration).

    ``cfg.pretrained`` is a weights path (the pipeline resolves ``synthetic`` as for TrainSegmentation).
    Every ``checkpoint_every`` iterations the model, optimiser, log and RNG states go to ``resume_dir/last.pt``
    (:mod:`stages.training.engine`); a later call with the same ``resume_dir`` continues from there.
    ``stop_after`` ends early without the final files (tests: a kill). ``processes > 1`` runs DGCN's graph cuts
    in that many worker processes (same result)."""
    ids = list(ids)
    _check_inputs(cfg, manifest, ids, processes)
    out_dir = Path(out_dir)
    update_cfg = label_update_config(cfg)
    seed_everything(cfg.seed)
    model = build_seed_net(cfg, manifest.label_space.num_classes).to(device)
    optimizer = make_optimizer(optimizer_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    per_epoch = len(ids) // cfg.batch_size
    dataset = SeedCropSet(manifest, ids, seed_label, cfg)
    pool = make_pool(processes) if cfg.method == "graphcut" and processes > 1 else None

    def batches(start: int) -> DataLoader:
        return DataLoader(dataset, batch_sampler=batch_schedule(len(ids), cfg.batch_size, cfg.seed, start,
                                                                cfg.iterations), num_workers=loader_workers)

    def step_fn(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict]:
        images, rgbs, seeds, present = batch
        images = images.to(device)
        if cfg.method == "graphcut":
            logits, features = model.forward_with_features(images)
        else:
            logits, features = model(images), None
        grid_seeds = nearest_resize(seeds.numpy(), tuple(logits.shape[-2:]))
        tic = time.perf_counter()
        if features is not None:
            step = dgcn_step(logits, features, rgbs.numpy(), grid_seeds, present.numpy(), update_cfg, executor=pool)
        else:
            step = dsrg_step(logits, rgbs.numpy(), grid_seeds, present.numpy(), update_cfg)
        return step.loss, {"seed_loss": float(step.seed_loss.item()),
                           "constrain_loss": float(step.constrain_loss.item()),
                           "seed_fraction": float((grid_seeds != IGNORE_INDEX).mean()),
                           "label_fraction": float((step.labels != IGNORE_INDEX).float().mean().item()),
                           "update_seconds": round(time.perf_counter() - tic, 4)}

    def on_step(loop: TrainingLoop, iteration: int, micro: list[tuple[float, dict]]) -> str | None:
        (loss, extras), = micro
        if not math.isfinite(loss):
            raise FloatingPointError(f"TrainSeedNet: loss became non-finite at iteration {iteration}; "
                                     "lower TrainSeedNet.lr")
        loop.rows.append({"epoch": (iteration - 1) // per_epoch, "iteration": iteration, "loss": loss,
                          "seed_loss": extras["seed_loss"], "constrain_loss": extras["constrain_loss"],
                          "lr": optimizer.param_groups[0]["lr"], "seed_fraction": extras["seed_fraction"],
                          "label_fraction": extras["label_fraction"], "update_seconds": extras["update_seconds"],
                          "seconds": loop.seconds()})
        if iteration % max(1, per_epoch) and iteration != cfg.iterations:
            return None
        return f"iteration {iteration}/{cfg.iterations} loss {loss:.4f} " \
               f"labelled {100 * extras['label_fraction']:.1f}%"

    model.train()
    loop = TrainingLoop(model, optimizer, cfg.iterations, batches,
                        lambda step: _set_lr(optimizer, lr_factor(cfg, step, per_epoch)), step_fn, on_step,
                        checkpoint_every=cfg.checkpoint_every, resume_dir=resume_dir, progress=progress,
                        desc="TrainSeedNet", stop_after=stop_after)
    try:
        result = loop.run()
    finally:
        if pool is not None:
            pool.shutdown()
    if result.stopped:
        return {"stopped_at": result.step}
    with atomic_path(out_dir / MODEL_WEIGHTS) as tmp:
        torch.save(model.state_dict(), tmp)
    write_csv(out_dir / TRAINING_LOG, loop.rows)
    rows = loop.rows
    last = rows[-max(1, per_epoch):]
    return {"final_loss": float(np.mean([r["loss"] for r in last])), "iterations": result.step,
            "resumed_from": result.resumed_from, "images": len(ids), "method": cfg.method,
            "seed_fraction": float(np.mean([r["seed_fraction"] for r in last])),
            "label_fraction": float(np.mean([r["label_fraction"] for r in last])),
            "update_seconds_mean": float(np.mean([r["update_seconds"] for r in rows])),
            "seconds": result.seconds}


def seed_net_inputs(cfg: TrainSeedNetConfig, model: nn.Module,
                    device: torch.device) -> Callable[[np.ndarray, Sequence[int]], dict]:
    """``inputs(rgb, keys)`` for the propagation step: the net's multi-scale class probabilities."""
    def inputs(rgb: np.ndarray, keys: Sequence[int]) -> dict:
        return {"probs": predict_seed_net(cfg, model, rgb, keys, device)}
    return inputs

"""DeepLab retraining on pseudo labels (or GT, for the fully supervised ceiling), inference and evaluation.

Training follows deeplab-pytorch's VOC recipe (``configs/voc.cfg`` sets its values): SGD with momentum,
backbone 1x / head weights 10x / head biases 20x without decay, poly decay stepped every
``lr_decay_every`` iterations, gradient accumulation, random scale from a discrete set, pad (image with the
mean, label 255), random crop, horizontal flip; cross-entropy ignoring 255 against the label
nearest-sampled to each output's size (all MSC outputs summed).
Differences, on purpose: images are normalised with the ImageNet mean and std (our backbones are
torchvision's), and images are resized with bilinear interpolation in RGB.

The data order is a seeded permutation per epoch and every augmentation draw is keyed by (seed, epoch,
image), so a run that resumes from a checkpoint continues exactly as if it had never stopped.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from data.artifacts import MODEL_WEIGHTS, TRAINING_LOG
from data.io import atomic_path, write_csv
from data.labelspace import IGNORE_INDEX
from data.manifest import Manifest
from data.transforms import normalize
from stages.config import TrainSegmentationConfig, validate
from stages.runtime import seed_everything
from stages.segmentation.model import build_model, evaluate_model
from stages.training.engine import TrainingLoop
from stages.training.optim import make_optimizer, poly_lr

# (image_id, the image's (H, W)) -> its label map; a source reading a file checks the size so that its error
# names the file.
LabelSource = Callable[[str, tuple[int, int]], np.ndarray]


def agreed_labels(refined: np.ndarray, propagated: np.ndarray, ignore: int = IGNORE_INDEX) -> np.ndarray:
    """``pseudo_labels = agreed`` (ours): the CRF's label where it kept the propagated label, ``ignore`` where it
    changed it. The CRF moves labels at object boundaries and in regions the walk left unsure, where the
    pseudo labels are most often wrong; DeepLab then learns from the pixels both maps agree on."""
    if refined.shape != propagated.shape:
        raise ValueError(f"refined labels {refined.shape} and propagated labels {propagated.shape} differ in size")
    return np.where(refined == propagated, refined, np.asarray(ignore, refined.dtype))


def nearest_resize(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Sample label pixel centres (PIL's nearest), not torch's corner-aligned nearest (deeplab-pytorch #51)."""
    h, w = label.shape[-2:]
    rows = np.minimum(((np.arange(size[0]) + 0.5) * h / size[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * w / size[1]).astype(np.int64), w - 1)
    return label[..., rows[:, None], cols[None, :]]


def augment(rgb: np.ndarray, label: np.ndarray, cfg: TrainSegmentationConfig,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """deeplab-pytorch's train transform: discrete random scale, pad, random crop, flip."""
    scale = float(rng.choice(cfg.scales))
    h, w = label.shape
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_LINEAR)
    label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
    x = normalize(rgb)
    crop = cfg.crop_size
    ph, pw = max(crop - x.shape[1], 0), max(crop - x.shape[2], 0)
    if ph or pw:  # zero is the mean after normalisation; padded labels are ignored
        x = np.pad(x, ((0, 0), (0, ph), (0, pw)))
        label = np.pad(label, ((0, ph), (0, pw)), constant_values=255)
    top = int(rng.integers(0, x.shape[1] - crop + 1))
    left = int(rng.integers(0, x.shape[2] - crop + 1))
    x = x[:, top:top + crop, left:left + crop]
    label = label[top:top + crop, left:left + crop]
    if rng.random() < 0.5:
        x, label = x[:, :, ::-1], label[:, ::-1]
    return np.ascontiguousarray(x), np.ascontiguousarray(label)


class SegmentationSet(Dataset):
    def __init__(self, manifest: Manifest, ids: Sequence[str], labels: LabelSource, cfg: TrainSegmentationConfig):
        self.layout, self.ids, self.labels, self.cfg = manifest.layout, list(ids), labels, cfg

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = key
        image_id = self.ids[index]
        rgb = self.layout.read_image(image_id)
        label = self.labels(image_id, rgb.shape[:2])
        if label.shape != rgb.shape[:2]:  # a source that does not check the size itself
            raise ValueError(f"label of image {image_id!r} is {label.shape}, the image is {rgb.shape[:2]}")
        x, y = augment(rgb, label, self.cfg, np.random.default_rng([self.cfg.seed, epoch, index]))
        return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))


def batch_schedule(n: int, batch_size: int, seed: int, start: int, stop: int) -> list[list[tuple[int, int]]]:
    """Batches ``start..stop-1`` of an endless stream of seeded per-epoch permutations (incomplete batches dropped).

    Each sample is (epoch, index). Batch i is the same whichever iteration a run starts from.
    """
    per_epoch = n // batch_size
    batches, orders = [], {}
    for i in range(start, stop):
        epoch, step = divmod(i, per_epoch)
        if epoch not in orders:
            orders = {epoch: np.random.default_rng([seed, epoch]).permutation(n)}
        batches.append([(epoch, int(j)) for j in orders[epoch][step * batch_size:(step + 1) * batch_size]])
    return batches


def segmentation_loss(outputs: torch.Tensor | list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """CE (ignore 255) of each output against the label nearest-sampled to its size, summed over outputs."""
    total = 0.0
    for logits in outputs if isinstance(outputs, list) else [outputs]:
        target = nearest_resize(labels, tuple(logits.shape[-2:]))
        total = total + F.cross_entropy(logits, target, ignore_index=255)
    return total


def train_segmentation(cfg: TrainSegmentationConfig, manifest: Manifest, labels: LabelSource,
                       out_dir: str | os.PathLike, device: torch.device,
                       resume_dir: str | os.PathLike | None = None, loader_workers: int = 0,
                       progress: Callable[[float, str], None] | None = None,
                       stop_after: int | None = None) -> dict:
    """Train on ``manifest.splits['train']`` with ``labels(id)``; writes ``model.pt`` and ``log.csv``.

    Every ``checkpoint_every`` iterations the model, optimiser, log and RNG states go to ``resume_dir/last.pt``
    (:mod:`stages.training.engine`); a later call with the same ``resume_dir`` continues from there.
    ``stop_after`` ends the run early (tests use it to simulate a kill) without writing the final files.
    """
    validate(cfg)
    out_dir = Path(out_dir)
    ids = manifest.splits["train"]
    if len(ids) < cfg.batch_size:
        raise ValueError(f"TrainSegmentation: {len(ids)} training images is fewer than batch_size={cfg.batch_size}")
    seed_everything(cfg.seed)
    model = build_model(cfg, manifest.label_space.num_classes).to(device)
    optimizer = make_optimizer(model.param_groups(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    dataset = SegmentationSet(manifest, ids, labels, cfg)
    per_epoch = max(1, len(ids) // (cfg.batch_size * cfg.accumulation))

    def batches(start: int) -> DataLoader:
        steps = batch_schedule(len(ids), cfg.batch_size, cfg.seed, start * cfg.accumulation,
                               cfg.iterations * cfg.accumulation)
        return DataLoader(dataset, batch_sampler=steps, num_workers=loader_workers)

    def set_lr(step: int) -> None:
        # Poly decay stepped every lr_decay_every iterations, as deeplab-pytorch does.
        poly_lr(optimizer, step - step % cfg.lr_decay_every, cfg.iterations, cfg.poly_power)

    def step_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        images, targets = batch
        return segmentation_loss(model(images.to(device)), targets.to(device)), {}

    def on_step(loop: TrainingLoop, iteration: int, micro: list[tuple[float, dict]]) -> str | None:
        window = loop.carry.setdefault("window", [])
        window.extend(loss for loss, _ in micro)
        if not math.isfinite(window[-1]):
            raise FloatingPointError(f"TrainSegmentation: loss became non-finite at iteration {iteration}; "
                                     "lower TrainSegmentation.lr")
        if iteration % per_epoch and iteration != cfg.iterations:
            return None
        epoch = math.ceil(iteration / per_epoch)
        val = train = None
        if (cfg.eval_every and epoch % cfg.eval_every == 0) or iteration == cfg.iterations:
            val = evaluate_model(model, manifest, manifest.splits["val"], device)
            if cfg.train_eval_images:
                train = evaluate_model(model, manifest, ids[:cfg.train_eval_images], device, labels)
        loop.rows.append({"epoch": epoch, "iteration": iteration,
                          "loss": float(np.sum(window) / max(1, len(window) / cfg.accumulation)),
                          "lr": optimizer.param_groups[0]["lr"], "val_miou": val, "train_miou": train,
                          "seconds": loop.seconds()})
        loop.carry["window"] = []
        shown = f", val mIoU {100 * val:.1f}" if val is not None else ""
        shown += f", train mIoU {100 * train:.1f}" if train is not None else ""
        return f"iteration {iteration}/{cfg.iterations} loss {loop.rows[-1]['loss']:.4f}{shown}"

    model.train()
    loop = TrainingLoop(model, optimizer, cfg.iterations, batches, set_lr, step_fn, on_step,
                        accumulation=cfg.accumulation, checkpoint_every=cfg.checkpoint_every, resume_dir=resume_dir,
                        progress=progress, desc="TrainSegmentation", stop_after=stop_after)
    result = loop.run()
    if result.stopped:
        return {"stopped_at": result.step}
    with atomic_path(out_dir / MODEL_WEIGHTS) as tmp:
        torch.save(model.state_dict(), tmp)
    write_csv(out_dir / TRAINING_LOG, loop.rows)
    return {"final_loss": loop.rows[-1]["loss"], "iterations": result.step, "resumed_from": result.resumed_from,
            "images": len(ids), "val_miou": loop.rows[-1]["val_miou"], "train_miou": loop.rows[-1]["train_miou"],
            "seconds": result.seconds}

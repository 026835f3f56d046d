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
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from data.io import atomic_path, write_csv
from data.manifest import Manifest
from data.transforms import normalize
from models.deeplab import create_segmenter
from stages.config import EvalSegmentationConfig, TrainSegmentationConfig, validate
from stages.metrics import confusion, segmentation_scores
from stages.runtime import seed_everything
from stages.training.optim import make_optimizer, poly_lr

CHECKPOINT = "model.pt"
LOG = "log.csv"
RESUME = "last.pt"

# (image_id, the image's (H, W)) -> its label map; a source reading a file checks the size so that its error
# names the file.
LabelSource = Callable[[str, tuple[int, int]], np.ndarray]


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


def build_model(cfg: TrainSegmentationConfig, num_classes: int, pretrained: bool = True) -> nn.Module:
    model = create_segmenter(cfg.model, cfg.backbone, num_classes,
                             pretrained=cfg.pretrained if pretrained and cfg.pretrained else None,
                             freeze_bn=cfg.freeze_bn, msc=cfg.msc)
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


def predict_labels(model: nn.Module, rgb: np.ndarray, cfg: EvalSegmentationConfig, device: torch.device,
                   crf_backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """EvalSegmentation's prediction of one image: the argmax (H, W) uint8 of :func:`predict_probs` at
    ``cfg.scales`` (and flip), and the same after ``cfg.crf_preset`` (the argmax again when ``cfg.crf`` is off)."""
    from stages.refine.crf import refine

    probs = predict_probs(model, rgb, device, cfg.scales, cfg.flip)
    raw = probs.argmax(0).astype(np.uint8)
    if not cfg.crf:
        return raw, raw
    return raw, refine(rgb, probs, cfg.crf_preset, backend=crf_backend, device=device).astype(np.uint8)


def evaluate_model(model: nn.Module, manifest: Manifest, ids: Sequence[str], device: torch.device) -> float:
    """Single-scale val mIoU, for the training log."""
    space = manifest.label_space
    conf = np.zeros((space.num_classes, space.num_classes), np.int64)
    was_training = model.training
    model.eval()
    for image_id in ids:
        pred = predict_probs(model, manifest.layout.read_image(image_id), device).argmax(0)
        conf += confusion(manifest.layout.read_label(image_id, evaluation=True), pred, space.num_classes,
                          space.ignore_index)
    model.train(was_training)
    return segmentation_scores(conf)["miou"]


def _save_resume(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, iteration: int, rows: list[dict],
                 window: list[float], elapsed: float) -> None:
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": iteration,
                    "rows": rows, "window": window, "elapsed": elapsed}, tmp)


def train_segmentation(cfg: TrainSegmentationConfig, manifest: Manifest, labels: LabelSource,
                       out_dir: str | os.PathLike, device: torch.device,
                       resume_dir: str | os.PathLike | None = None, loader_workers: int = 0,
                       progress: Callable[[float, str], None] | None = None,
                       stop_after: int | None = None) -> dict:
    """Train on ``manifest.splits['train']`` with ``labels(id)``; writes ``model.pt`` and ``log.csv``.

    Every ``checkpoint_every`` iterations the model, optimiser and log go to ``resume_dir/last.pt``; a later
    call with the same ``resume_dir`` continues from there. ``stop_after`` ends the run early (tests use it
    to simulate a kill) without writing the final files.
    """
    from tqdm import tqdm

    validate(cfg)
    out_dir = Path(out_dir)
    ids = manifest.splits["train"]
    if len(ids) < cfg.batch_size:
        raise ValueError(f"TrainSegmentation: {len(ids)} training images is fewer than batch_size={cfg.batch_size}")
    seed_everything(cfg.seed)
    model = build_model(cfg, manifest.label_space.num_classes).to(device)
    optimizer = make_optimizer(model.param_groups(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    start, rows, window, elapsed = 0, [], [], 0.0
    resume_path = Path(resume_dir) / RESUME if resume_dir else None
    if resume_path and resume_path.is_file():
        state = torch.load(resume_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, rows, window, elapsed = state["iteration"], state["rows"], state["window"], state["elapsed"]
        if progress:
            progress(100.0 * start / cfg.iterations, f"resumed at iteration {start}/{cfg.iterations}")
    dataset = SegmentationSet(manifest, ids, labels, cfg)
    steps = batch_schedule(len(ids), cfg.batch_size, cfg.seed, start * cfg.accumulation,
                           cfg.iterations * cfg.accumulation)
    loader = DataLoader(dataset, batch_sampler=steps, num_workers=loader_workers)
    per_epoch = max(1, len(ids) // (cfg.batch_size * cfg.accumulation))
    model.train()
    began = time.time() - elapsed
    bar = tqdm(total=cfg.iterations, initial=start, desc="TrainSegmentation", file=sys.stderr, mininterval=10,
               disable=None)
    iteration, micro = start, 0
    optimizer.zero_grad(set_to_none=True)
    for images, targets in loader:
        if micro == 0:
            # Poly decay stepped every lr_decay_every iterations, as deeplab-pytorch does.
            poly_lr(optimizer, iteration - iteration % cfg.lr_decay_every, cfg.iterations, cfg.poly_power)
        loss = segmentation_loss(model(images.to(device)), targets.to(device)) / cfg.accumulation
        loss.backward()
        window.append(float(loss.item()))
        micro += 1
        if micro < cfg.accumulation:
            continue
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        micro = 0
        iteration += 1
        bar.update(1)
        if not math.isfinite(window[-1]):
            raise FloatingPointError(f"TrainSegmentation: loss became non-finite at iteration {iteration}; "
                                     "lower TrainSegmentation.lr")
        if iteration % per_epoch == 0 or iteration == cfg.iterations:
            epoch = math.ceil(iteration / per_epoch)
            val = None
            if cfg.eval_every and (epoch % cfg.eval_every == 0 or iteration == cfg.iterations):
                val = evaluate_model(model, manifest, manifest.splits["val"], device)
            rows.append({"epoch": epoch, "iteration": iteration,
                         "loss": float(np.sum(window) / max(1, len(window) / cfg.accumulation)),
                         "lr": optimizer.param_groups[0]["lr"], "val_miou": val,
                         "seconds": round(time.time() - began, 2)})
            window = []
            if progress:
                shown = f", val mIoU {100 * val:.1f}" if val is not None else ""
                progress(100.0 * iteration / cfg.iterations,
                         f"iteration {iteration}/{cfg.iterations} loss {rows[-1]['loss']:.4f}{shown}")
        if resume_path and (iteration % cfg.checkpoint_every == 0) and iteration < cfg.iterations:
            resume_path.parent.mkdir(parents=True, exist_ok=True)
            _save_resume(resume_path, model, optimizer, iteration, rows, window, time.time() - began)
        if stop_after is not None and iteration >= stop_after:
            bar.close()
            return {"stopped_at": iteration}
    bar.close()
    with atomic_path(out_dir / CHECKPOINT) as tmp:
        torch.save(model.state_dict(), tmp)
    write_csv(out_dir / LOG, rows)
    final_val = next((r["val_miou"] for r in reversed(rows) if r["val_miou"] is not None), None)
    return {"final_loss": rows[-1]["loss"], "iterations": iteration, "resumed_from": start,
            "images": len(ids), "val_miou": final_val, "seconds": round(time.time() - began, 2)}


def load_segmenter(cfg: TrainSegmentationConfig, num_classes: int, directory: str | os.PathLike,
                   device: torch.device) -> nn.Module:
    model = build_model(cfg, num_classes, pretrained=False)
    model.load_state_dict(torch.load(Path(directory) / CHECKPOINT, map_location="cpu", weights_only=True))
    return model.to(device).eval()


def predict_images(cfg: EvalSegmentationConfig, model: nn.Module, manifest: Manifest, ids: Sequence[str],
                   out_dir: Path, device: torch.device, crf_backend: str = "auto",
                   progress: Callable[[float, str], None] | None = None) -> dict:
    """Predictions ``labels/<id>.png`` (after the CRF when ``cfg.crf``; ``raw/<id>.png`` before it) and the
    confusion matrices of both, as nested lists, for the stage to sum over shards."""
    from data.artifacts import label_file
    from data.io import write_label_png

    validate(cfg)
    space = manifest.label_space
    n = space.num_classes
    conf_raw = np.zeros((n, n), np.int64)
    conf_crf = np.zeros((n, n), np.int64)
    for k, image_id in enumerate(ids, start=1):
        rgb = manifest.layout.read_image(image_id)
        raw, final = predict_labels(model, rgb, cfg, device, crf_backend)
        gt = manifest.layout.read_label(image_id, evaluation=True)
        conf_raw += confusion(gt, raw, n, space.ignore_index)
        if cfg.crf:
            conf_crf += confusion(gt, final, n, space.ignore_index)
            raw_path = out_dir / "raw" / f"{image_id}.png"
            raw_path.parent.mkdir(parents=True, exist_ok=True)
            write_label_png(raw_path, raw, space.palette)
        path = label_file(out_dir, image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_label_png(path, final, space.palette)
        if progress and (k % 20 == 0 or k == len(ids)):
            progress(100.0 * k / len(ids), f"{k}/{len(ids)} images")
    return {"confusion_raw": conf_raw.tolist(), "confusion_crf": conf_crf.tolist() if cfg.crf else None}


def write_segmentation_metrics(cfg: EvalSegmentationConfig, space, joined: dict, out_dir: Path,
                               labels: str = "pseudo") -> dict:
    """``metrics.json`` from the summed confusion matrices; returns the headline numbers."""
    from data.io import write_json

    raw = segmentation_scores(np.asarray(joined["confusion_raw"]))
    final = segmentation_scores(np.asarray(joined["confusion_crf"])) if cfg.crf else raw
    metrics = {
        "miou": final["miou"], "miou_no_crf": raw["miou"], "crf": cfg.crf, "crf_preset": cfg.crf_preset,
        "per_class_iou": dict(zip(space.names, final["iou"])),
        "per_class_iou_no_crf": dict(zip(space.names, raw["iou"])),
        "pixel_accuracy": final["pixel_accuracy"], "mean_accuracy": final["mean_accuracy"], "fwiou": final["fwiou"],
        "n_images": joined["images"], "scales": list(cfg.scales), "flip": cfg.flip, "trained_on": labels,
        "protocol": "deeplab-pytorch scores(): dataset-level confusion, GT 255 ignored, mIoU over GT-present classes",
    }
    write_json(out_dir / "metrics.json", metrics)
    return {k: metrics[k] for k in ("miou", "miou_no_crf", "pixel_accuracy", "mean_accuracy", "fwiou", "n_images")}

"""GMNet training: a part segmenter conditioned on object maps, on the shared training engine.

Loss (LTTM/GMNet ``train.py``, spec A.3), on the logits bilinearly upsampled (corners aligned) to the crop:
part CE (ignore 255) + ``aux_lambda`` x CE of the part logits **summed per object** against the object GT +
``gm_lambda`` x the graph-matching loss (:mod:`stages.parts.graph_matching`, ``gm_mode``). With
``gm_resolution = logits`` (ours) the graph-matching term is taken on the stride-4 logits against labels sampled
at that grid: 16x fewer pixels, which on the demo's CPU backbone is the difference between the loss costing
twice the network's step and a few percent of it (``python -m bench.gm_loss``).

Augmentation is GMNet's: one random scale from ``scales``, pad (image with the mean, labels 255, object maps
``cond_pad``), random crop, horizontal flip; the image, the part map, the object label map and the object maps
go through the same geometry (maps bilinear, labels nearest). Object maps are the conditioning input; the
object label map feeds the auxiliary loss only.

``cond_source = none`` trains a plain DeepLab-v3+ on the parts (the unconditioned baseline); otherwise
``gmnet``. Learning rates: backbone 1x, new layers' weights ``head_lr_mult``, their biases
``head_lr_mult x bias_lr_mult`` without decay (GMNet: 1 and 2; the project's DeepLab: 10 and 20).
The batch order and every augmentation draw are keyed by (seed, epoch, image), as TrainSegmentation.
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
from torch import nn
from torch.utils.data import DataLoader, Dataset

from data.artifacts import MODEL_WEIGHTS, TRAINING_LOG
from data.io import atomic_path, write_csv
from data.manifest import Manifest
from data.parts import PartLayout, PartSpace, load_part_space
from data.transforms import normalize
from models.segmenters import create_segmenter
from stages.config import TrainPartSegmentationConfig, validate
from stages.parts import part_model
from stages.parts.graph_matching import graph_matching_loss
from stages.runtime import seed_everything
from stages.segmentation.model import load_matching
from stages.segmentation.train import batch_schedule
from stages.training.engine import TrainingLoop
from stages.training.optim import make_optimizer, poly_lr

# image id -> its object maps (O, H, W) float32 at the image's size
ObjectMaps = Callable[[str], np.ndarray]
IGNORE = 255


def part_layout(manifest: Manifest, cfg: TrainPartSegmentationConfig) -> PartLayout:
    """The dataset's part maps and part space (object maps from the manifest's training GT folder)."""
    space = load_part_space(cfg.part_space, manifest.root, manifest.label_space)
    return PartLayout(manifest.root, space, cfg.part_dir, manifest.seg_dir, cfg.part_object_band)


def build_part_model(cfg: TrainPartSegmentationConfig, space: PartSpace, pretrained: bool = True) -> nn.Module:
    weights = cfg.pretrained if pretrained and cfg.pretrained else None
    name = part_model(cfg.cond_source)
    conditioning = ({"num_objects": space.num_objects, "cond_mult": cfg.cond_mult or None,
                     "cond_stride": cfg.cond_stride} if name == "gmnet" else {})
    model = create_segmenter(name, cfg.backbone, space.num_parts, pretrained=weights, freeze_bn=cfg.freeze_bn,
                             **conditioning)
    if pretrained and cfg.init_checkpoint:
        load_matching(model, cfg.init_checkpoint)
    return model


def run_model(model: nn.Module, images: torch.Tensor, maps: torch.Tensor | None) -> torch.Tensor:
    return model(images) if maps is None else model(images, maps)


def param_groups(model: nn.Module, cfg: TrainPartSegmentationConfig) -> list[dict]:
    """The segmenter's groups (backbone 1x, head weights 10x, head biases 20x) with GMNet's multipliers."""
    groups = model.param_groups()
    for g in groups:
        if g["lr_mult"] == 10.0:
            g["lr_mult"] = cfg.head_lr_mult
        elif g["lr_mult"] == 20.0:
            g["lr_mult"] = cfg.head_lr_mult * cfg.bias_lr_mult
    return groups


def gt_object_maps(objects: np.ndarray, num_objects: int) -> np.ndarray:
    """One-hot (O, H, W) of an object label map; 255 pixels get the uniform 1/O."""
    valid = objects != IGNORE
    maps = np.zeros((num_objects, *objects.shape), np.float32)
    rows, cols = np.nonzero(valid)
    maps[objects[valid].astype(np.int64), rows, cols] = 1.0
    maps[:, ~valid] = 1.0 / num_objects
    return maps


def augment_parts(rgb: np.ndarray, parts: np.ndarray, objects: np.ndarray, maps: np.ndarray | None,
                  cfg: TrainPartSegmentationConfig, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Scale, pad, crop and flip the image (3, S, S normalised), both label maps and the object maps alike."""
    scale = float(rng.choice(cfg.scales))
    h, w = parts.shape
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    x = normalize(cv2.resize(rgb, size, interpolation=cv2.INTER_LINEAR))
    parts = cv2.resize(parts, size, interpolation=cv2.INTER_NEAREST)
    objects = cv2.resize(objects, size, interpolation=cv2.INTER_NEAREST)
    if maps is not None:
        maps = _resize_stack(maps, size)
    crop = cfg.crop_size
    ph, pw = max(crop - x.shape[1], 0), max(crop - x.shape[2], 0)
    if ph or pw:  # zero is the mean after normalisation; padded labels are ignored
        x = np.pad(x, ((0, 0), (0, ph), (0, pw)))
        parts = np.pad(parts, ((0, ph), (0, pw)), constant_values=IGNORE)
        objects = np.pad(objects, ((0, ph), (0, pw)), constant_values=IGNORE)
        if maps is not None:
            maps = np.pad(maps, ((0, 0), (0, ph), (0, pw)), constant_values=float(cfg.cond_pad))
    top = int(rng.integers(0, x.shape[1] - crop + 1))
    left = int(rng.integers(0, x.shape[2] - crop + 1))
    window = (slice(top, top + crop), slice(left, left + crop))
    x, parts, objects = x[:, window[0], window[1]], parts[window], objects[window]
    maps = maps[:, window[0], window[1]] if maps is not None else None
    if rng.random() < 0.5:
        x, parts, objects = x[:, :, ::-1], parts[:, ::-1], objects[:, ::-1]
        maps = maps[:, :, ::-1] if maps is not None else None
    contiguous = np.ascontiguousarray
    return contiguous(x), contiguous(parts), contiguous(objects), None if maps is None else contiguous(maps)


def _resize_stack(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, H, W) float maps resized bilinearly to ``size`` = (W, H), 256 channels at a time (OpenCV's limit)."""
    chunks = []
    for start in range(0, maps.shape[0], 256):
        chunk = cv2.resize(np.ascontiguousarray(maps[start:start + 256].transpose(1, 2, 0)), size,
                           interpolation=cv2.INTER_LINEAR)
        chunks.append(chunk.reshape(size[1], size[0], -1).transpose(2, 0, 1))
    return np.concatenate(chunks)


class PartSet(Dataset):
    """(image, part map, object map, object maps) per (epoch, index); object maps empty when unconditioned."""

    def __init__(self, manifest: Manifest, ids: Sequence[str], layout: PartLayout, maps: ObjectMaps | None,
                 cfg: TrainPartSegmentationConfig):
        self.images, self.ids, self.layout, self.maps, self.cfg = manifest.layout, list(ids), layout, maps, cfg

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        epoch, index = key
        image_id = self.ids[index]
        rgb = self.images.read_image(image_id)
        parts, objects = self.layout.read(image_id, rgb.shape[:2])
        maps = self.maps(image_id) if self.maps is not None else None
        if maps is not None and maps.shape[1:] != rgb.shape[:2]:
            raise ValueError(f"object maps of image {image_id!r} are {maps.shape[1:]}, the image is {rgb.shape[:2]}")
        x, parts, objects, maps = augment_parts(rgb, parts, objects, maps, self.cfg,
                                                np.random.default_rng([self.cfg.seed, epoch, index]))
        cond = torch.from_numpy(maps) if maps is not None else torch.zeros(0)
        return (torch.from_numpy(x), torch.from_numpy(parts.astype(np.int64)),
                torch.from_numpy(objects.astype(np.int64)), cond)


def object_logits(part_logits: torch.Tensor, object_of_part: torch.Tensor, num_objects: int) -> torch.Tensor:
    """GMNet's aux head: part logits (not probabilities) summed within each object's group."""
    shape = (part_logits.shape[0], num_objects, *part_logits.shape[2:])
    return part_logits.new_zeros(shape).index_add_(1, object_of_part, part_logits)


def sample_labels(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Labels (B, H, W) read at the logits' grid (B, C, h, w): the label pixel nearest each logit under the
    align-corners mapping that upsamples the logits to the labels (logit j sits on label pixel j (H-1)/(h-1))."""
    (h, w), (big_h, big_w) = logits.shape[-2:], labels.shape[-2:]

    def nearest(n: int, big: int) -> torch.Tensor:
        step = (big - 1) / max(n - 1, 1)
        return (torch.arange(n, device=labels.device) * step).round().long()

    return labels[:, nearest(h, big_h)][:, :, nearest(w, big_w)]


def part_losses(logits: torch.Tensor, parts: torch.Tensor, objects: torch.Tensor, object_of_part: torch.Tensor,
                num_objects: int, cfg: TrainPartSegmentationConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its terms (unweighted) for logits at any stride against crop-size labels."""
    up = F.interpolate(logits, size=parts.shape[-2:], mode="bilinear", align_corners=True)
    ce = F.cross_entropy(up, parts, ignore_index=IGNORE)
    total = ce
    terms = {"ce": ce.item()}
    if cfg.aux_lambda:
        aux = F.cross_entropy(object_logits(up, object_of_part, num_objects), objects, ignore_index=IGNORE)
        total = total + cfg.aux_lambda * aux
        terms["aux"] = aux.item()
    if cfg.gm_mode != "off":
        gm_logits, gm_parts = (up, parts) if cfg.gm_resolution == "label" else (logits, sample_labels(parts, logits))
        gm = graph_matching_loss(gm_logits, gm_parts, cfg.gm_mode, cfg.gm_dilation, cfg.gm_valid)
        total = total + cfg.gm_lambda * gm
        terms["gm"] = gm.item()
    return total, terms


def train_parts(cfg: TrainPartSegmentationConfig, manifest: Manifest, layout: PartLayout, maps: ObjectMaps | None,
                out_dir: str | os.PathLike, device: torch.device, resume_dir: str | os.PathLike | None = None,
                loader_workers: int = 0, progress: Callable[[float, str], None] | None = None,
                evaluate: Callable[[nn.Module], float] | None = None, stop_after: int | None = None) -> dict:
    """Train on ``manifest.splits['train']``; writes ``model.pt`` and ``log.csv`` (loss terms per epoch).

    ``maps`` is None exactly when ``cfg.cond_source == "none"``. ``evaluate(model)`` (val part mIoU) runs
    every ``eval_every`` epochs and at the end, when given.
    """
    validate(cfg)
    if (maps is None) != (cfg.cond_source == "none"):
        raise ValueError(f"TrainPartSegmentation.cond_source = {cfg.cond_source} but object maps were "
                         f"{'not ' if maps is None else ''}given")
    out_dir = Path(out_dir)
    ids = manifest.splits["train"]
    if len(ids) < cfg.batch_size:
        raise ValueError(f"TrainPartSegmentation: {len(ids)} training images is fewer than "
                         f"batch_size={cfg.batch_size}")
    space = layout.space
    seed_everything(cfg.seed)
    model = build_part_model(cfg, space).to(device)
    optimizer = make_optimizer(param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    dataset = PartSet(manifest, ids, layout, maps, cfg)
    owner = torch.tensor(space.object_of_part, device=device)
    per_epoch = max(1, len(ids) // cfg.batch_size)

    def batches(start: int) -> DataLoader:
        steps = batch_schedule(len(ids), cfg.batch_size, cfg.seed, start, cfg.iterations)
        return DataLoader(dataset, batch_sampler=steps, num_workers=loader_workers)

    def set_lr(step: int) -> None:
        poly_lr(optimizer, step - step % cfg.lr_decay_every, cfg.iterations, cfg.poly_power)

    def step_fn(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict]:
        images, parts, objects, cond = (t.to(device) for t in batch)
        logits = run_model(model, images, cond if maps is not None else None)
        return part_losses(logits, parts, objects, owner, space.num_objects, cfg)

    def on_step(loop: TrainingLoop, iteration: int, micro: list[tuple[float, dict]]) -> str | None:
        window = loop.carry.setdefault("window", [])
        window.extend([loss, *(terms.get(k, 0.0) for k in ("ce", "aux", "gm"))] for loss, terms in micro)
        if not math.isfinite(window[-1][0]):
            raise FloatingPointError(f"TrainPartSegmentation: loss became non-finite at iteration {iteration}; "
                                     "lower TrainPartSegmentation.lr")
        if iteration % per_epoch and iteration != cfg.iterations:
            return None
        epoch = math.ceil(iteration / per_epoch)
        val = None
        if evaluate is not None and ((cfg.eval_every and epoch % cfg.eval_every == 0) or iteration == cfg.iterations):
            val = evaluate(model)
            model.train()
        mean = np.mean(window, 0)
        loop.rows.append({"epoch": epoch, "iteration": iteration, "loss": float(mean[0]), "ce": float(mean[1]),
                          "aux": float(mean[2]), "gm": float(mean[3]), "lr": optimizer.param_groups[0]["lr"],
                          "val_part_miou": val, "seconds": loop.seconds()})
        loop.carry["window"] = []
        shown = f", val part mIoU {100 * val:.1f}" if val is not None else ""
        return f"iteration {iteration}/{cfg.iterations} loss {mean[0]:.4f}{shown}"

    model.train()
    loop = TrainingLoop(model, optimizer, cfg.iterations, batches, set_lr, step_fn, on_step,
                        checkpoint_every=cfg.checkpoint_every, resume_dir=resume_dir, progress=progress,
                        desc="TrainPartSegmentation", stop_after=stop_after)
    result = loop.run()
    if result.stopped:
        return {"stopped_at": result.step}
    with atomic_path(out_dir / MODEL_WEIGHTS) as tmp:
        torch.save(model.state_dict(), tmp)
    write_csv(out_dir / TRAINING_LOG, loop.rows)
    last = loop.rows[-1]
    return {"final_loss": last["loss"], "final_gm": last["gm"], "iterations": result.step,
            "resumed_from": result.resumed_from, "images": len(ids), "val_part_miou": last["val_part_miou"],
            "seconds": result.seconds}


def load_part_model(cfg: TrainPartSegmentationConfig, space: PartSpace, directory: str | os.PathLike,
                    device: torch.device) -> nn.Module:
    model = build_part_model(cfg, space, pretrained=False)
    model.load_state_dict(torch.load(Path(directory) / MODEL_WEIGHTS, map_location="cpu", weights_only=True))
    return model.to(device).eval()


def predict_part_probs(model: nn.Module, rgb: np.ndarray, maps: np.ndarray | None, device: torch.device,
                       flip: bool = False) -> np.ndarray:
    """Part probabilities (C, H, W) at scale 1 (GMNet's eval), averaged with the flipped input when asked."""
    h, w = rgb.shape[:2]
    x = torch.from_numpy(normalize(rgb))[None].to(device)
    cond = torch.from_numpy(np.ascontiguousarray(maps, np.float32))[None].to(device) if maps is not None else None
    with torch.no_grad():
        if flip:
            x = torch.cat([x, x.flip(-1)])
            cond = torch.cat([cond, cond.flip(-1)]) if cond is not None else None
        logits = F.interpolate(run_model(model, x, cond), size=(h, w), mode="bilinear", align_corners=True)
        probs = logits.softmax(1)
        if flip:
            probs = (probs[:1] + probs[1:].flip(-1)) / 2
    return probs[0].cpu().numpy()

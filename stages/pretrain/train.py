"""Synthetic pretraining: the ImageNet initialisation of the references, for runs that have no weights file.

IRN, PSA and SEAM never train a backbone from scratch; a network that does learns the embedded dataset's
scene shortcuts and gives CAMs that are as high on background as on the object. This stage classifies
images with one object each, in any scene (``data.synthetic.pretraining_profile``), rendered on the fly from
their own seed space, so no pretraining image is a dataset image. It writes ``backbone.pth``, a plain state
dict in the backbone's key layout that ``create_backbone(..., pretrained=path)`` loads like ImageNet weights,
plus ``log.csv`` (loss and accuracy per 100 steps) and the accuracy on held-out renders.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from data import synthetic
from data.artifacts import BACKBONE_WEIGHTS, TRAINING_LOG
from data.io import write_csv
from data.transforms import normalize
from models.classifier import ImageClassifier
from models.resnet import BACKBONES, create_backbone
from stages.config import PretrainBackboneConfig, validate
from stages.runtime import seed_everything
from stages.training.engine import TrainingLoop
from stages.training.optim import make_optimizer, poly_lr

LOG_EVERY = 100


class SyntheticObjects(Dataset):
    """``length`` one-object images and their class index, each a pure function of (seed, split, index)."""

    def __init__(self, seed: int, split: str, length: int, size: int, flip: bool):
        self.seed, self.split, self.length, self.flip = seed, split, length, flip
        self.profile = synthetic.pretraining_profile(size)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = synthetic.render_sample(self.seed, self.split, index, self.profile)
        rgb = sample.image[:, ::-1] if self.flip and index % 2 else sample.image
        return torch.from_numpy(normalize(np.ascontiguousarray(rgb))), sample.objects[0].cls


def _accuracy(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in loader:
            correct += int((model(images.to(device)).argmax(1).cpu() == labels).sum())
            total += len(labels)
    return correct / max(total, 1)


def pretrain_backbone(cfg: PretrainBackboneConfig, out_dir: str | os.PathLike, device: torch.device,
                      loader_workers: int = 1, progress: Callable[[float, str], None] | None = None,
                      resume_dir: Path | None = None, checkpoint_every: int = LOG_EVERY,
                      stop_after: int | None = None) -> dict:
    """Train ``cfg.backbone`` for ``cfg.steps`` steps; writes ``backbone.pth`` and ``log.csv`` into ``out_dir``.

    Every ``checkpoint_every`` steps the run is checkpointed to ``resume_dir`` (when given) and a later call with the
    same ``resume_dir`` continues from there (:mod:`stages.training.engine`); ``stop_after`` ends early without
    the final files (tests: a kill)."""
    validate(cfg)
    BACKBONES.get(cfg.backbone, key="PretrainBackbone.backbone")
    out_dir = Path(out_dir)
    seed_everything(cfg.seed)
    num_classes = synthetic.label_space().num_classes - 1
    model = ImageClassifier(create_backbone(cfg.backbone), num_classes).to(device)
    optimizer = make_optimizer([{"params": list(model.parameters())}], lr=cfg.lr,
                               weight_decay=cfg.weight_decay)
    # Every image is new (an endless stream cut to steps x batch), so the order needs no shuffling.
    stream = SyntheticObjects(cfg.seed, "pretrain", cfg.steps * cfg.batch_size, cfg.image_size, flip=True)

    def batches(start: int) -> DataLoader:
        order = list(range(start * cfg.batch_size, cfg.steps * cfg.batch_size))
        return DataLoader(stream, batch_sampler=[order[i:i + cfg.batch_size] for i in range(0, len(order),
                                                                                           cfg.batch_size)],
                          num_workers=loader_workers)

    def step_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        images, labels = batch
        logits = model(images.to(device, non_blocking=True))
        loss = F.cross_entropy(logits, labels.to(device))
        return loss, {"hit": float((logits.argmax(1).cpu() == labels).float().mean())}

    def on_step(loop: TrainingLoop, done: int, micro: list[tuple[float, dict]]) -> str | None:
        (loss, extras), = micro
        if not math.isfinite(loss):
            raise FloatingPointError(f"PretrainBackbone: loss became non-finite at step {done - 1}; lower the lr")
        losses, hits = loop.carry.setdefault("losses", []), loop.carry.setdefault("hits", [])
        losses.append(loss)
        hits.append(extras["hit"])
        del losses[:-LOG_EVERY], hits[:-LOG_EVERY]  # only the last LOG_EVERY are ever read (and checkpointed)
        if done % LOG_EVERY and done != cfg.steps:
            return None
        loop.rows.append({"step": done, "loss": float(np.mean(losses[-LOG_EVERY:])),
                          "train_accuracy": float(np.mean(hits[-LOG_EVERY:])),
                          "lr": optimizer.param_groups[0]["lr"], "seconds": loop.seconds()})
        return f"step {done}/{cfg.steps} loss {loop.rows[-1]['loss']:.3f} " \
               f"accuracy {loop.rows[-1]['train_accuracy']:.2f}"

    model.train()
    loop = TrainingLoop(model, optimizer, cfg.steps, batches,
                        lambda step: poly_lr(optimizer, step, cfg.steps, cfg.poly_power), step_fn, on_step,
                        checkpoint_every=checkpoint_every, resume_dir=resume_dir, progress=progress,
                        desc="PretrainBackbone", stop_after=stop_after)
    result = loop.run()
    if result.stopped:
        return {"stopped_at": result.step}
    held_out = SyntheticObjects(cfg.seed, "pretrain-eval", cfg.eval_images, cfg.image_size, flip=False)
    accuracy = _accuracy(model, DataLoader(held_out, batch_size=64, num_workers=loader_workers), device)
    torch.save(model.backbone.state_dict(), out_dir / BACKBONE_WEIGHTS)  # out_dir is the stage's temporary directory
    write_csv(out_dir / TRAINING_LOG, loop.rows)
    return {"final_loss": loop.rows[-1]["loss"], "held_out_accuracy": accuracy, "chance": 1.0 / num_classes,
            "images": cfg.steps * cfg.batch_size, "resumed_from": result.resumed_from, "seconds": result.seconds}

"""Train the CAM classification network (IRN's ``train_cam``).

Recipe: multilabel soft-margin loss; SGD with poly decay per step; backbone at ``lr`` and the head at
``head_lr_mult`` x ``lr``; IRN's resize-long / flip / crop augmentation (plus PSA/SEAM's colour jitter when
``color_jitter`` > 0); ``drop_last``. The loss is the model's own (``model.training_loss``: IRN's soft margin,
or SEAM's Siamese losses), whose parts are averaged per epoch into ``log.csv``. Every random draw
comes from generators seeded by ``cfg.seed`` and the sample index, so a run is reproducible whatever the
number of loader workers.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data.io import write_csv
from data.manifest import Manifest
from data.transforms import train_transform
from stages.cam_methods import CHECKPOINT, build_cam_model
from stages.config import TrainCAMConfig, validate
from stages.optim import make_optimizer, poly_lr
from stages.runtime import seed_everything


class ClassificationSet(Dataset):
    def __init__(self, manifest: Manifest, ids: list[str], cfg: TrainCAMConfig):
        self.layout = manifest.layout
        self.ids = ids
        self.labels = [manifest.multi_hot(i) for i in ids]
        self.cfg = cfg
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.cfg.seed, self.epoch, index])
        rgb = self.layout.read_image(self.ids[index])
        x = train_transform(rgb, self.cfg.resize_long, self.cfg.crop_size, rng, jitter=self.cfg.color_jitter)
        return torch.from_numpy(x), torch.from_numpy(self.labels[index])


def train_cam(cfg: TrainCAMConfig, manifest: Manifest, out_dir: str | os.PathLike,
              device: torch.device, loader_workers: int = 1,
              progress: Callable[[float, str], None] | None = None) -> dict:
    """Train on ``manifest.splits['train']``; writes ``model.pt`` and ``log.csv`` into ``out_dir``."""
    validate(cfg)
    out_dir = Path(out_dir)
    generator = seed_everything(cfg.seed)
    ids = manifest.splits["train"]
    dataset = ClassificationSet(manifest, ids, cfg)
    if len(ids) < cfg.batch_size:
        raise ValueError(f"TrainCAM: {len(ids)} training images is fewer than batch_size={cfg.batch_size}")
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                        num_workers=loader_workers, generator=generator,
                        persistent_workers=False)
    model = build_cam_model(cfg, manifest.label_space.num_classes - 1).to(device)
    optimizer = make_optimizer(model.param_groups(cfg.head_lr_mult), lr=cfg.lr, optimizer=cfg.optimizer,
                               momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               momentum_quirk=cfg.momentum_quirk)
    steps_per_epoch = len(loader)
    total = steps_per_epoch * cfg.num_epochs
    step = 0
    rows = []
    start = time.time()
    for epoch in range(cfg.num_epochs):
        dataset.epoch = epoch
        model.train()
        losses = []
        part_sums: dict[str, float] = {}
        for images, labels in loader:
            poly_lr(optimizer, step, total, cfg.poly_power)
            loss, parts = model.training_loss(images.to(device, non_blocking=True), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            for name, value in parts.items():
                part_sums[name] = part_sums.get(name, 0.0) + float(value)
            step += 1
        if not all(math.isfinite(v) for v in losses):
            raise FloatingPointError(f"TrainCAM: loss became non-finite in epoch {epoch}; lower the learning rate")
        row = {"epoch": epoch + 1, "step": step, "loss": float(np.mean(losses)),
               **{f"loss_{name}": total_part / len(losses) for name, total_part in part_sums.items()},
               "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.time() - start, 2)}
        rows.append(row)
        if progress:
            progress(100.0 * (epoch + 1) / cfg.num_epochs, f"epoch {epoch + 1}/{cfg.num_epochs} loss {row['loss']:.4f}")
    torch.save(model.state_dict(), out_dir / CHECKPOINT)
    write_csv(out_dir / "log.csv", rows)
    return {"final_loss": rows[-1]["loss"], "steps": step, "images": len(ids),
            "seconds": round(time.time() - start, 2)}

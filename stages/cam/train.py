"""Train the CAM classification network (IRN's ``train_cam``).

Recipe: multilabel soft-margin loss; SGD with poly decay per step; backbone at ``lr`` and the head at
``head_lr_mult`` x ``lr``; IRN's resize-long / flip / crop augmentation (plus PSA/SEAM's colour jitter when
``color_jitter`` > 0); ``drop_last``. The loss is the model's own (``model.training_loss``: IRN's soft margin,
or SEAM's Siamese losses), whose parts are averaged per epoch into ``log.csv``. Every random draw
comes from generators seeded by ``cfg.seed``, the epoch and the sample index, so a run is reproducible
whatever the number of loader workers.

Multi-process (DDP) training: run this module under torchrun (``python -m stages.cam.train --config
cfg.json --manifest DIR --out DIR``; :func:`stages.training.distributed.launch_torchrun` does it). Each epoch has
one seeded permutation whatever the number of processes W; every global batch of ``cfg.batch_size``
images is cut into W consecutive slices and rank r takes slice r, so the union of the ranks' samples at
any step is exactly the one-process batch. Gradients are averaged by DDP (equal slices: the global mean),
logged losses are averaged over ranks, and only rank 0 writes files. BatchNorm statistics stay per rank
(as in IRN and PSA), the one difference from a one-process run when ``freeze_bn`` is off.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler

from data.artifacts import MODEL_WEIGHTS, TRAINING_LOG
from data.io import atomic_path, read_json, write_csv, write_json
from data.manifest import Manifest
from data.transforms import train_transform
from stages.cam.methods import build_cam_model
from stages.config import TrainCAMConfig, validate
from stages.runtime import configure_threads, seed_everything
from stages.training import distributed
from stages.training.engine import TrainingLoop, epoch_batches
from stages.training.optim import make_optimizer, poly_lr

PROGRESS_PREFIX = "TrainCAM progress: "   # rank 0's stdout lines a parent process turns back into progress


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


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's sample order: one permutation keyed by (seed, epoch), the same in every process."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def check_divisible(batch_size: int, processes: int) -> None:
    if processes < 1:
        raise ValueError(f"TrainCAM: the number of training processes must be at least 1, got {processes}")
    if batch_size % processes:
        raise ValueError(f"TrainCAM.batch_size = {batch_size} is not divisible by the {processes} training "
                         "processes ([wsss] train_processes); choose a batch size that splits evenly")


class GlobalBatchSampler(Sampler[list[int]]):
    """This rank's slice of each global batch of the epoch's order; incomplete last batches are dropped."""

    def __init__(self, n: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1):
        check_divisible(global_batch, world_size)
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.local_batch = global_batch // world_size
        self.offset = rank * self.local_batch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.global_batch

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_order(self.n, self.seed, self.epoch)
        for step in range(len(self)):
            start = step * self.global_batch + self.offset
            yield order[start:start + self.local_batch].tolist()


class _TrainingLoss(nn.Module):
    """``forward`` = the net's ``training_loss``: DDP synchronises gradients only for calls through forward."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return self.net.training_loss(images, labels)


def train_cam(cfg: TrainCAMConfig, manifest: Manifest, out_dir: str | os.PathLike,
              device: torch.device, loader_workers: int = 1,
              progress: Callable[[float, str], None] | None = None, resume_dir: Path | None = None,
              checkpoint_every: int = 0, stop_after: int | None = None) -> dict:
    """Train on ``manifest.splits['train']``; writes ``model.pt`` and ``log.csv`` into ``out_dir``.

    Inside an initialised process group of W ranks each rank trains on its slice of every global batch
    (see the module docstring); the returned metrics are the same on every rank. With ``resume_dir`` the run
    is checkpointed there every ``checkpoint_every`` steps (0: every epoch; rank 0 writes, every rank reads)
    and a later call with the same ``resume_dir`` continues from there (:mod:`stages.training.engine`);
    ``stop_after`` ends early without the final files (tests: a kill).
    """
    validate(cfg)
    out_dir = Path(out_dir)
    world, rank = distributed.world_size(), distributed.rank()
    check_divisible(cfg.batch_size, world)
    generator = seed_everything(cfg.seed)
    ids = manifest.splits["train"]
    dataset = ClassificationSet(manifest, ids, cfg)
    if len(ids) < cfg.batch_size:
        raise ValueError(f"TrainCAM: {len(ids)} training images is fewer than batch_size={cfg.batch_size}")
    sampler = GlobalBatchSampler(len(ids), cfg.batch_size, cfg.seed, rank=rank, world_size=world)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=loader_workers, generator=generator,
                        persistent_workers=False)
    model = build_cam_model(cfg, manifest.label_space.num_classes - 1).to(device)
    optimizer = make_optimizer(model.param_groups(cfg.head_lr_mult), lr=cfg.lr, optimizer=cfg.optimizer,
                               momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               momentum_quirk=cfg.momentum_quirk)
    trainer: nn.Module = _TrainingLoss(model)
    if distributed.is_distributed():
        # Rank 0's initial weights are broadcast here; every rank built the same ones from cfg.seed anyway.
        trainer = DistributedDataParallel(trainer, device_ids=[device.index] if device.type == "cuda" else None)
    per_epoch = len(sampler)
    total = per_epoch * cfg.num_epochs

    def begin_epoch(epoch: int) -> None:
        dataset.epoch = epoch
        sampler.set_epoch(epoch)
        trainer.train()

    def step_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        images, labels = batch
        return trainer(images.to(device, non_blocking=True), labels.to(device))

    loop = TrainingLoop(model, optimizer, total,
                        lambda start: epoch_batches(loop, loader, per_epoch, start, begin_epoch),
                        lambda step: poly_lr(optimizer, step, total, cfg.poly_power), step_fn,
                        lambda lp, step, micro: _cam_log(lp, step, micro, cfg, per_epoch, device),
                        checkpoint_every=checkpoint_every or per_epoch, resume_dir=resume_dir, progress=progress,
                        desc="TrainCAM", torch_generators=[generator], main_process=distributed.is_main_process(),
                        stop_after=stop_after)
    result = loop.run()
    if result.stopped:
        return {"stopped_at": result.step}
    if distributed.is_main_process():
        with atomic_path(out_dir / MODEL_WEIGHTS) as tmp:
            torch.save(model.state_dict(), tmp)
        write_csv(out_dir / TRAINING_LOG, loop.rows)
    distributed.barrier()  # no rank reports success before rank 0's files are in place
    return {"final_loss": loop.rows[-1]["loss"], "steps": result.step, "images": len(ids),
            "resumed_from": result.resumed_from, "seconds": result.seconds}


def _cam_log(loop: TrainingLoop, step: int, micro: list[tuple[float, dict]], cfg: TrainCAMConfig,
             per_epoch: int, device: torch.device) -> str | None:
    """Sum the loss and its parts over the epoch; at its end, average over ranks into one log row."""
    (loss, parts), = micro
    losses = loop.carry.setdefault("losses", [])
    part_sums = loop.carry.setdefault("part_sums", {})
    losses.append(loss)
    for name, value in parts.items():
        part_sums[name] = part_sums.get(name, 0.0) + float(value)
    if step % per_epoch:
        return None
    epoch = step // per_epoch
    # Every rank ran the same number of equal-sized steps: the mean of the ranks' means is the global mean.
    # Reduced values are identical on all ranks, so all of them stop together on a non-finite loss.
    epoch_loss = distributed.all_reduce_mean(float(np.mean(losses)), device)
    part_means = {name: distributed.all_reduce_mean(total_part / len(losses), device)
                  for name, total_part in part_sums.items()}
    if not math.isfinite(epoch_loss):
        raise FloatingPointError(f"TrainCAM: loss became non-finite in epoch {epoch - 1}; lower the learning rate")
    row = {"epoch": epoch, "step": step, "loss": epoch_loss,
           **{f"loss_{name}": value for name, value in part_means.items()},
           "lr": loop.optimizer.param_groups[0]["lr"], "seconds": loop.seconds()}
    loop.rows.append(row)
    loop.carry.update(losses=[], part_sums={})
    return f"epoch {epoch}/{cfg.num_epochs} loss {row['loss']:.4f}"


# ------------------------------------------------------------------------------------------ entry point

def write_config(cfg: TrainCAMConfig, path: str | os.PathLike) -> None:
    write_json(path, dataclasses.asdict(cfg))


def read_config(path: str | os.PathLike) -> TrainCAMConfig:
    """A TrainCAMConfig from its JSON dump (lists become the tuples the dataclass holds)."""
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object of TrainCAMConfig fields")
    known = {f.name for f in dataclasses.fields(TrainCAMConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown TrainCAMConfig key(s): {', '.join(unknown)}")
    return TrainCAMConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def parse_progress(line: str) -> tuple[float, str] | None:
    """(percent, message) from a progress line of :func:`main`'s output, else None."""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    percent, _, message = line[len(PROGRESS_PREFIX):].partition(" ")
    try:
        return float(percent), message
    except ValueError:
        return None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.cam.train",
                                     description="Train the CAM network (one process, or one rank under torchrun).")
    parser.add_argument("--config", required=True, help="JSON dump of TrainCAMConfig")
    parser.add_argument("--manifest", required=True, help="directory holding the dataset manifest")
    parser.add_argument("--out", required=True, help="directory for model.pt and log.csv (rank 0 writes)")
    parser.add_argument("--metrics", default="", help="JSON file for the returned metrics (rank 0 writes)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (a rank takes GPU LOCAL_RANK)")
    parser.add_argument("--loader-workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per rank; 0 = PyTorch's default")
    return parser.parse_args(argv)


@record  # torchrun's failure summary then carries the failing rank's traceback
def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    configure_threads(args.threads)
    cfg = read_config(args.config)
    manifest = Manifest.load(args.manifest)
    device = distributed.init_distributed(args.device)
    try:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)

        def log_progress(percent: float, message: str) -> None:
            print(f"{PROGRESS_PREFIX}{percent:.1f} {message}", flush=True)

        metrics = train_cam(cfg, manifest, out_dir, device, loader_workers=args.loader_workers,
                            progress=log_progress)
        if args.metrics and distributed.is_main_process():
            write_json(args.metrics, metrics)
        distributed.barrier()
    finally:
        distributed.teardown()
    return metrics


if __name__ == "__main__":
    main()
    if distributed.launched_by_torchrun():
        distributed.exit_rank(0)

"""Train the inter-pixel relation network on confident seeds (PSA's ``train_aff``, IRN's ``train_irn``).

Two methods share one loop:

- ``affinitynet`` (PSA/SEAM): the backbone trains (BatchNorm frozen) under a feature head; pair labels come
  from the la/ha CRF score stacks (8x8 block mean, la/ha rule) or, when a seed method gives only labels, from
  the label map; loss 1/4 bg+ + 1/4 fg+ + 1/2 neg.
- ``a2gnn`` (A2GNN, :mod:`stages.affinity.a2gnn`): AffinityNet's head over a square window; pair labels from the
  seed PNG only (:func:`reads_score_seeds`).
- ``irnet`` (IRN): frozen backbone, boundary head at stride 4; labels are the seed map sampled x1/4 (nearest);
  loss (L_pos + L_neg) / 2 with L_pos = (bg+ + fg+) / 2, plus the displacement terms when that branch is on.

Deviation from both references, for a CPU demo without ImageNet weights: when ``TrainAffinity.pretrained`` is
empty and ``init_from_cam`` is set, the backbone starts from the trained CAM network's backbone (the
references start from ImageNet weights and never from the CAM net).

Seeds reach the dataset through two callables, so it does not care where they are stored:
``seed_label(image_id) -> uint8 (H, W)`` (255 = ignore) and ``seed_scores(image_id) -> (la, ha) | None``
with la/ha float arrays (K+1, H, W), channel 0 = background. Only equality of labels matters for pairs,
so the channel index serves as the label id whether the stacks hold all classes or the present ones.
With ``loader_workers > 0`` both callables must be picklable.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data.artifacts import MODEL_WEIGHTS, TRAINING_LOG
from data.io import BadInputError, write_csv
from data.labelspace import IGNORE_INDEX
from data.manifest import Manifest
from data.transforms import color_jitter, normalize, rescale
from models.affinity import AffinityNet, IRNet, pair_partners, source_window
from models.pairs import half_disc_offsets
from models.resnet import BACKBONES, ResNet, create_backbone
from stages.affinity import AFFINITY_METHODS
from stages.config import TrainAffinityConfig, validate
from stages.runtime import seed_everything
from stages.training.engine import TrainingLoop, epoch_batches
from stages.training.optim import make_optimizer, poly_lr

EPS = 1e-5

SeedLabelFn = Callable[[str], np.ndarray]
SeedScoresFn = Callable[[str], "tuple[np.ndarray, np.ndarray] | None"]


# ------------------------------------------------------------------------------------------------ models


def _a2gnn():
    """A2GNN's window net module, imported only for a2gnn nets (it is not part of the other methods' keys)."""
    return importlib.import_module(AFFINITY_METHODS.module_of("a2gnn"))


def _takes_strides(name: str) -> bool:
    """Whether a registered backbone is one of our ResNets (per-stage strides); ResNet-38 is not."""
    annotation = inspect.signature(BACKBONES.get(name)).return_annotation
    return annotation in ("ResNet", ResNet)


def load_cam_backbone(backbone: torch.nn.Module, cam_state: dict, backbone_name: str) -> None:
    """Copy the ``backbone.*`` weights of a CAM network's state dict into ``backbone``, or fail naming the mismatch."""
    state = {k.removeprefix("backbone."): v for k, v in cam_state.items() if k.startswith("backbone.")}
    if not state:
        raise ValueError("TrainAffinity.init_from_cam: the CAM checkpoint has no 'backbone.*' weights "
                         f"({len(cam_state)} keys, e.g. {list(cam_state)[:3]})")
    own = backbone.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or extra or wrong:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing, e.g. {missing[:3]}")
        if extra:
            detail.append(f"{len(extra)} unexpected, e.g. {extra[:3]}")
        if wrong:
            k = wrong[0]
            detail.append(f"{len(wrong)} of another shape, e.g. {k}: CAM {tuple(state[k].shape)} vs "
                          f"{tuple(own[k].shape)}")
        raise ValueError(f"TrainAffinity.backbone = {backbone_name!r} does not match the CAM network's backbone "
                         f"({'; '.join(detail)}); use the same backbone as TrainCAM, set "
                         "TrainAffinity.pretrained, or turn init_from_cam off")
    backbone.load_state_dict(state)


def build_backbone(cfg: TrainAffinityConfig, cam_backbone_state: dict | None, pretrained: bool) -> torch.nn.Module:
    weights = cfg.pretrained if pretrained and cfg.pretrained else None
    strides = cfg.strides if _takes_strides(cfg.backbone) else None
    backbone = create_backbone(cfg.backbone, strides=strides, pretrained=weights)
    if pretrained and not cfg.pretrained and cfg.init_from_cam and cam_backbone_state is not None:
        load_cam_backbone(backbone, cam_backbone_state, cfg.backbone)
    return backbone


def build_affinitynet(cfg: TrainAffinityConfig, cam_backbone_state: dict | None,
                      pretrained: bool = True) -> AffinityNet:
    """PSA's AffinityNet; ``pretrained=False`` builds the bare architecture (to load a checkpoint into)."""
    if cfg.displacement:
        raise ValueError("TrainAffinity.displacement applies to affinity_method = irnet only")
    return AffinityNet(build_backbone(cfg, cam_backbone_state, pretrained), freeze_backbone=cfg.freeze_backbone,
                       frozen_early=cfg.frozen_early_blocks)


def build_irnet(cfg: TrainAffinityConfig, cam_backbone_state: dict | None, pretrained: bool = True) -> IRNet:
    """IRN's IRNet; its backbone never trains."""
    if not cfg.freeze_backbone:
        raise ValueError("TrainAffinity.freeze_backbone = False: irnet always keeps its backbone frozen")
    return IRNet(build_backbone(cfg, cam_backbone_state, pretrained), displacement=cfg.displacement)


def load_affinity_model(cfg: TrainAffinityConfig, directory: str | os.PathLike,
                        device: torch.device) -> torch.nn.Module:
    """The trained net of ``directory``/model.pt, in eval mode on ``device``."""
    model = AFFINITY_METHODS.get(cfg.affinity_method)(cfg, None, pretrained=False)
    path = Path(directory) / MODEL_WEIGHTS
    if not path.is_file():
        raise BadInputError(path, "affinity checkpoint is missing")
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise BadInputError(path, f"does not fit TrainAffinity.affinity_method = {cfg.affinity_method!r}, "
                                  f"backbone = {cfg.backbone!r} ({str(err).splitlines()[0]})") from None
    return model.to(device).eval()

# ----------------------------------------------------------------------------------------------- labels


def labels_from_scores(la: np.ndarray, ha: np.ndarray, stride: int) -> np.ndarray:
    """PSA's la/ha rule on ``stride`` x ``stride`` block means of the two (K+1, H, W) score stacks.

    label = argmax(la); la background -> 255 (unsure); ha background -> 0 (confident bg); blocks whose scores
    are all below 1e-5 (crop padding) -> 255. Partial blocks at the border are padded with zero scores.
    """
    def block_mean(scores: np.ndarray) -> np.ndarray:
        c, h, w = scores.shape
        hp, wp = math.ceil(h / stride) * stride, math.ceil(w / stride) * stride
        padded = np.zeros((c, hp, wp), np.float32)
        padded[:, :h, :w] = scores
        return padded.reshape(c, hp // stride, stride, wp // stride, stride).mean((2, 4))

    la, ha = block_mean(la), block_mean(ha)
    la_arg, ha_arg = la.argmax(0), ha.argmax(0)
    label = la_arg.astype(np.uint8)
    label[la_arg == 0] = IGNORE_INDEX
    label[ha_arg == 0] = 0
    label[np.maximum(la.max(0), ha.max(0)) < EPS] = IGNORE_INDEX
    return label


def subsample_labels(label: np.ndarray, stride: int) -> np.ndarray:
    """Nearest-neighbour x1/stride, sampling block centres as PIL's nearest resize does: (ceil(H/s), ceil(W/s))."""
    h, w = label.shape
    rows = np.minimum(np.arange(math.ceil(h / stride)) * stride + stride // 2, h - 1)
    cols = np.minimum(np.arange(math.ceil(w / stride)) * stride + stride // 2, w - 1)
    return np.ascontiguousarray(label[np.ix_(rows, cols)])


def pair_label_masks(labels: torch.Tensor, radius: int) -> dict[str, torch.Tensor]:
    """P+_bg, P+_fg and P- of (B, h, w) label maps (255 = ignore): float masks (B, D, hs, ws)."""
    src, dst = pair_partners(labels, radius)
    valid = (src != IGNORE_INDEX) & (dst != IGNORE_INDEX)
    same = valid & (src == dst)
    return {"bg": (same & (src == 0)).float(), "fg": (same & (src != 0)).float(), "neg": (valid & (src != dst)).float()}


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / (mask.sum() + EPS)


def pair_losses(affinity: torch.Tensor, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-set mean cross-entropy terms over the whole batch: bg/fg pull affinity up, neg pushes it down."""
    pos = -torch.log(affinity + EPS)
    neg = -torch.log(1 + EPS - affinity)
    return {"bg": _masked_mean(pos, masks["bg"]), "fg": _masked_mean(pos, masks["fg"]),
            "neg": _masked_mean(neg, masks["neg"])}


def affinitynet_loss(affinity: torch.Tensor, masks: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """PSA: 1/4 bg+ + 1/4 fg+ + 1/2 neg."""
    parts = pair_losses(affinity, masks)
    return parts["bg"] / 4 + parts["fg"] / 4 + parts["neg"] / 2, parts


def displacement_losses(displacement: torch.Tensor, masks: dict[str, torch.Tensor],
                        radius: int) -> dict[str, torch.Tensor]:
    """IRN: D_i - D_j should equal the offset (dy, dx) inside an object (fg+) and vanish on background (bg+)."""
    src, dst = pair_partners(displacement, radius)      # (B, 2, 1, hs, ws), (B, 2, D, hs, ws)
    delta = src - dst
    target = torch.tensor(half_disc_offsets(radius), dtype=delta.dtype, device=delta.device).T[None, :, :, None, None]
    fg = (delta - target).abs().mean(1)
    bg = delta.abs().mean(1)
    return {"dp_fg": _masked_mean(fg, masks["fg"]), "dp_bg": _masked_mean(bg, masks["bg"])}


def irnet_loss(affinity: torch.Tensor, masks: dict[str, torch.Tensor], displacement: torch.Tensor | None = None,
               radius: int | None = None) -> tuple[torch.Tensor, dict]:
    """IRN: (L_pos + L_neg) / 2 with L_pos = (bg+ + fg+) / 2, plus (dp_fg + dp_bg) / 2 with displacement."""
    parts = pair_losses(affinity, masks)
    loss = (parts["bg"] / 2 + parts["fg"] / 2 + parts["neg"]) / 2
    if displacement is not None:
        if radius is None:
            raise ValueError("irnet_loss needs the pair radius for the displacement terms")
        parts.update(displacement_losses(displacement, masks, radius))
        loss = loss + (parts["dp_fg"] + parts["dp_bg"]) / 2
    return loss, parts


def training_loss(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  radius: int) -> tuple[torch.Tensor, dict, dict]:
    """(loss, loss parts, pair masks) of one batch for any of the nets (a2gnn: its own window radius)."""
    if getattr(model, "window_graph", False):
        return _a2gnn().affinity_loss(model, images, labels)
    out = model.pair_affinity(images, radius)
    masks = pair_label_masks(labels, radius)
    if masks["bg"].shape != out["affinity"].shape:
        raise ValueError(f"label grid {tuple(labels.shape[-2:])} does not match the network's output grid for "
                         f"{tuple(images.shape[-2:])} inputs; pick TrainAffinity.crop_size as a multiple of "
                         f"{model.label_stride}")
    if isinstance(model, IRNet):
        loss, parts = irnet_loss(out["affinity"], masks, out.get("displacement"), radius)
    else:
        loss, parts = affinitynet_loss(out["affinity"], masks)
    return loss, parts, masks

# ---------------------------------------------------------------------------------------------- dataset


def joint_crop(arrays: Sequence[np.ndarray], fills: Sequence[float], size: int,
               rng: np.random.Generator) -> list[np.ndarray]:
    """The same random ``size`` crop of several (C, H, W) arrays; smaller ones land at a random offset
    in a canvas filled with each array's ``fill``."""
    h, w = arrays[0].shape[-2:]
    ch, cw = min(size, h), min(size, w)
    sy, sx = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    dy, dx = int(rng.integers(0, size - ch + 1)), int(rng.integers(0, size - cw + 1))
    out = []
    for a, fill in zip(arrays, fills):
        canvas = np.full((a.shape[0], size, size), fill, a.dtype)
        canvas[:, dy:dy + ch, dx:dx + cw] = a[:, sy:sy + ch, sx:sx + cw]
        out.append(canvas)
    return out


def _resize_stack(stack: np.ndarray, size: tuple[int, int], interpolation: int) -> np.ndarray:
    """Resize a (C, H, W) array to (C, h, w) = size, channel by channel."""
    return np.stack([cv2.resize(c, (size[1], size[0]), interpolation=interpolation) for c in stack])


def reads_score_seeds(cfg: TrainAffinityConfig, supervision: str) -> bool:
    """Whether the pair labels come from PSA's la/ha CRF score maps (when stored) rather than the seed PNG.

    Only PSA/SEAM's AffinityNet reads the maps (``train_aff`` loads the la and ha CRF folders), and only on
    image-level seeds: the maps know nothing of points, scribbles or boxes, which the PNG carries. A2GNN's seed
    rule stores la/ha maps too, but its affinity net reads the label PNG alone; IRNet reads the PNG (IR labels).
    """
    return cfg.affinity_method == "affinitynet" and supervision == "image"


def seeds_of(image_id: str, size: tuple[int, int] | None, seed_label: SeedLabelFn | None,
             seed_scores: SeedScoresFn | None) -> tuple[str, np.ndarray]:
    """("scores", (2K+2, H, W) la then ha) or ("label", (1, H, W) uint8), checked against the image size
    (when ``size`` is given)."""
    scores = seed_scores(image_id) if seed_scores is not None else None
    if scores is not None:
        la, ha = (np.asarray(s, np.float32) for s in scores)
        if la.ndim != 3 or la.shape != ha.shape or (size is not None and la.shape[1:] != tuple(size)):
            raise ValueError(f"image {image_id!r}: la/ha seed scores must be two (K+1, H, W) stacks of the image "
                             f"size {size}, got {la.shape} and {ha.shape}")
        return "scores", np.concatenate([la, ha])
    if seed_label is None:
        raise ValueError(f"image {image_id!r}: no seed scores and no seed label callable")
    label = np.asarray(seed_label(image_id))
    if label.ndim != 2 or (size is not None and label.shape != tuple(size)):
        raise ValueError(f"image {image_id!r}: seed label map is {label.shape}, image is {size} (H, W)")
    return "label", label.astype(np.uint8)[None]


def _has_labelled_pixel(kind: str, seeds: np.ndarray) -> bool:
    if kind == "label":
        return bool((seeds != IGNORE_INDEX).any())
    la, ha = np.split(seeds, 2)
    known = (la.argmax(0) != 0) | (ha.argmax(0) == 0)
    return bool((known & (np.maximum(la.max(0), ha.max(0)) >= EPS)).any())


class AffinitySet(Dataset):
    """(normalised image crop (3, S, S), label grid (S/stride, S/stride) int64 with 255 = ignore) per image.

    Every draw comes from a generator seeded by (cfg.seed, epoch, index), whatever the loader workers.
    """

    def __init__(self, manifest: Manifest, ids: Sequence[str], cfg: TrainAffinityConfig, label_stride: int,
                 seed_label: SeedLabelFn | None, seed_scores: SeedScoresFn | None):
        self.layout = manifest.layout
        self.ids = list(ids)
        self.cfg = cfg
        self.label_stride = label_stride
        self.seed_label = seed_label
        self.seed_scores = seed_scores
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        image_id = self.ids[index]
        rng = np.random.default_rng([cfg.seed, self.epoch, index])
        rgb = self.layout.read_image(image_id)
        kind, seeds = seeds_of(image_id, rgb.shape[:2], self.seed_label, self.seed_scores)
        if cfg.color_jitter > 0:
            rgb = color_jitter(rgb, cfg.color_jitter, rng)
        low, high = cfg.scale_range
        if (low, high) != (1, 1):
            rgb = rescale(rgb, float(rng.uniform(low, high)))
            seeds = _resize_stack(seeds, rgb.shape[:2], cv2.INTER_NEAREST if kind == "label" else cv2.INTER_LINEAR)
        x = normalize(rgb)
        if rng.random() < 0.5:
            x, seeds = x[:, :, ::-1], seeds[:, :, ::-1]
        x, seeds = joint_crop([x, seeds], [0, IGNORE_INDEX if kind == "label" else 0], cfg.crop_size, rng)
        if kind == "label":
            label = subsample_labels(seeds[0], self.label_stride)
        else:
            la, ha = np.split(seeds, 2)
            label = labels_from_scores(la, ha, self.label_stride)
        return torch.from_numpy(x), torch.from_numpy(label.astype(np.int64))

# --------------------------------------------------------------------------------------------- training


def _check_config(cfg: TrainAffinityConfig) -> None:
    validate(cfg)
    AFFINITY_METHODS.module_of(cfg.affinity_method, key="TrainAffinity.affinity_method")  # raises, listing them
    if cfg.lr <= 0 or cfg.batch_size < 1 or cfg.num_epochs < 1 or cfg.crop_size < 8:
        raise ValueError(f"TrainAffinity: lr, batch_size, num_epochs and crop_size must be positive: {cfg}")
    if cfg.radius < 2:
        raise ValueError(f"TrainAffinity.radius must be at least 2, got {cfg.radius}")
    if len(cfg.scale_range) != 2 or not 0 < cfg.scale_range[0] <= cfg.scale_range[1]:
        raise ValueError(f"TrainAffinity.scale_range must be (low, high) with 0 < low <= high, got {cfg.scale_range}")
    if not 0 <= cfg.color_jitter < 1:
        raise ValueError(f"TrainAffinity.color_jitter must be in [0, 1), got {cfg.color_jitter}")


def train_affinity(cfg: TrainAffinityConfig, manifest: Manifest, ids: Sequence[str], seed_label: SeedLabelFn | None,
                   seed_scores: SeedScoresFn | None, out_dir: str | os.PathLike, device: torch.device,
                   cam_backbone_state: dict | None = None, loader_workers: int = 0,
                   progress: Callable[[float, str], None] | None = None, resume_dir: Path | None = None,
                   checkpoint_every: int = 0, stop_after: int | None = None, supervision: str = "image") -> dict:
    """Train on ``ids``; writes ``model.pt`` (state dict) and ``log.csv`` into ``out_dir``; returns metrics.

    ``seed_scores`` is read only where the method's reference reads score maps (:func:`reads_score_seeds` for the
    seeds' ``supervision``); otherwise the pair labels come from ``seed_label``.

    With ``resume_dir`` the run is checkpointed there every ``checkpoint_every`` steps (0: every epoch) and a
    later call with the same ``resume_dir`` continues from there (:mod:`stages.training.engine`);
    ``stop_after`` ends early without the final files (tests: a kill)."""
    _check_config(cfg)
    if not reads_score_seeds(cfg, supervision):
        seed_scores = None
    out_dir = Path(out_dir)
    ids = list(ids)
    if len(ids) < cfg.batch_size:
        raise ValueError(f"TrainAffinity: {len(ids)} training images is fewer than batch_size={cfg.batch_size}")
    if cfg.init_from_cam and not cfg.pretrained and cam_backbone_state is None:
        raise ValueError("TrainAffinity.init_from_cam is set and TrainAffinity.pretrained is empty, "
                         "but no CAM network state was given")
    # Sizes against the images are checked when the loader reads them; here only the seeds are read.
    unlabelled = sum(not _has_labelled_pixel(*seeds_of(i, None, seed_label, seed_scores)) for i in ids)
    if unlabelled == len(ids):
        raise ValueError(f"TrainAffinity: none of the {len(ids)} training images has a labelled seed pixel "
                         "(every seed is 255 = ignore); loosen the seed thresholds")

    generator = seed_everything(cfg.seed)
    model = AFFINITY_METHODS.get(cfg.affinity_method)(cfg, cam_backbone_state).to(device)
    grid = math.ceil(cfg.crop_size / model.label_stride)
    if not getattr(model, "window_graph", False):  # a2gnn's window pads at the border: any grid works
        source_window(grid, grid, cfg.radius)  # fails early, naming crop_size and radius, if no pair fits a crop
    dataset = AffinitySet(manifest, ids, cfg, model.label_stride, seed_label, seed_scores)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                        num_workers=loader_workers, generator=generator, persistent_workers=False)
    optimizer = make_optimizer(model.param_groups(), lr=cfg.lr, optimizer=cfg.optimizer, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, momentum_quirk=cfg.momentum_quirk)
    per_epoch = len(loader)
    total = per_epoch * cfg.num_epochs

    def begin_epoch(epoch: int) -> None:
        dataset.epoch = epoch
        model.train()

    loop = TrainingLoop(model, optimizer, total,
                        lambda start: epoch_batches(loop, loader, per_epoch, start, begin_epoch, generator),
                        lambda step: poly_lr(optimizer, step, total, cfg.poly_power),
                        lambda batch: _affinity_step(model, batch, device, cfg.radius),
                        lambda lp, step, micro: _affinity_log(lp, step, micro, cfg, per_epoch, len(ids)),
                        checkpoint_every=checkpoint_every or per_epoch, resume_dir=resume_dir, progress=progress,
                        desc="TrainAffinity", torch_generators=[generator], stop_after=stop_after)
    result = loop.run()
    if result.stopped:
        return {"stopped_at": result.step}
    torch.save(model.state_dict(), out_dir / MODEL_WEIGHTS)
    write_csv(out_dir / TRAINING_LOG, loop.rows)
    return {"final_loss": loop.rows[-1]["loss"], "steps": result.step, "images": len(ids),
            "images_without_labels": unlabelled, "resumed_from": result.resumed_from, "seconds": result.seconds}


def _affinity_step(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device,
                   radius: int) -> tuple[torch.Tensor, dict]:
    images, labels = batch
    loss, parts, masks = training_loss(model, images.to(device, non_blocking=True), labels.to(device), radius)
    return loss, {"parts": parts, "masks": masks}


def _affinity_log(loop: TrainingLoop, step: int, micro: list[tuple[float, dict]], cfg: TrainAffinityConfig,
                  per_epoch: int, n_images: int) -> str | None:
    """Sum the losses and pair counts over the epoch; at its end, one log row (and a progress message)."""
    (loss, extras), = micro
    sums = loop.carry.setdefault("sums", {})
    pairs = loop.carry.setdefault("pairs", {"bg": 0.0, "fg": 0.0, "neg": 0.0})
    for key, value in {"loss": loss, **{k: v.item() for k, v in extras["parts"].items()}}.items():
        sums[key] = sums.get(key, 0.0) + value
    for key in pairs:
        pairs[key] += extras["masks"][key].sum().item()
    if step % per_epoch:
        return None
    epoch = step // per_epoch
    if sum(pairs.values()) == 0:
        raise ValueError(f"TrainAffinity: no labelled pixel pair in epoch {epoch} over {n_images} images "
                         f"(radius {cfg.radius}); the seeds are too sparse for the crops")
    means = {k: v / per_epoch for k, v in sums.items()}
    if not all(math.isfinite(v) for v in means.values()):
        raise FloatingPointError(f"TrainAffinity: loss became non-finite in epoch {epoch}; "
                                 "lower the learning rate")
    row = {"epoch": epoch, "step": step, **{k: round(v, 6) for k, v in means.items()},
           **{f"pairs_{k}": int(v) for k, v in pairs.items()},
           "lr": loop.optimizer.param_groups[0]["lr"], "seconds": loop.seconds()}
    loop.rows.append(row)
    loop.carry.update(sums={}, pairs={"bg": 0.0, "fg": 0.0, "neg": 0.0})
    return f"epoch {epoch}/{cfg.num_epochs} loss {row['loss']:.4f}"

# -------------------------------------------------------------------------------------------- inference


def padded_input(rgb: np.ndarray, multiple: int, device: torch.device) -> torch.Tensor:
    """Normalised (1, 3, H', W') tensor, zero-padded at the bottom/right to multiples of ``multiple``."""
    x = normalize(rgb)
    h, w = x.shape[1:]
    hp, wp = math.ceil(h / multiple) * multiple, math.ceil(w / multiple) * multiple
    padded = np.zeros((3, hp, wp), np.float32)
    padded[:, :h, :w] = x
    return torch.from_numpy(padded)[None].to(device)


@torch.no_grad()
def infer_boundary(model: IRNet, rgb: np.ndarray, device: torch.device) -> np.ndarray:
    """IRN's class-boundary map B (ceil(H/4), ceil(W/4)) in [0, 1]: sigmoid of the mean of the image's logits
    and its mirror's, flipped back. Pads to a multiple of 16 (IRN pads to 512, which breaks larger images)."""
    return infer_boundary_features(model, rgb, device, features=False)["boundary"]


@torch.no_grad()
def infer_boundary_features(model: IRNet, rgb: np.ndarray, device: torch.device,
                            features: bool = True) -> dict[str, np.ndarray]:
    """{"boundary": B as :func:`infer_boundary` gives it} plus, with ``features``, WSGCN's node features
    {"boundary_features": (160, ceil(H/4), ceil(W/4))}: the boundary branch's concatenated maps (after ReLU) times
    the final 1x1 conv's weights, i.e. each channel's share of the boundary logit, image and mirror averaged."""
    model.eval()
    h, w = rgb.shape[:2]
    x = padded_input(rgb, 16, device)
    captured = []
    # The input of edge_out is the concatenated branch output; a hook reads it without re-implementing the branch.
    hook = model.edge_out.register_forward_hook(lambda _module, inputs, _out: captured.append(inputs[0]))
    try:
        logits = model.boundary_logits(model.taps(torch.cat([x, x.flip(-1)])))[:, 0]
    finally:
        hook.remove()
    grid = (math.ceil(h / 4), math.ceil(w / 4))
    boundary = torch.sigmoid((logits[0] + logits[1].flip(-1)) / 2)
    out = {"boundary": boundary[:grid[0], :grid[1]].float().cpu().numpy()}
    if features:
        weighted = captured[0] * model.edge_out.weight[:, :, 0, 0].reshape(1, -1, 1, 1)
        mean = (weighted[0] + weighted[1].flip(-1)) / 2
        out["boundary_features"] = mean[:, :grid[0], :grid[1]].float().cpu().numpy()
    return out


@torch.no_grad()
def infer_features(model: AffinityNet, rgb: np.ndarray, device: torch.device) -> np.ndarray:
    """AffinityNet's feature map (C, ceil(H/s), ceil(W/s)), s = its label stride (8), of the zero-padded image."""
    model.eval()
    h, w = rgb.shape[:2]
    s = model.label_stride
    features = model(padded_input(rgb, s, device))[0]
    return features[:, :math.ceil(h / s), :math.ceil(w / s)].float().cpu().numpy()


def infer_affinity_input(model: torch.nn.Module, rgb: np.ndarray, device: torch.device,
                         boundary_features: bool = False) -> dict[str, np.ndarray]:
    """What the random walk needs from the net: {"boundary": B} (IRNet), {"features": f} (AffinityNet) or the
    window graph (A2GNN: {"window_affinity", "node_features", "affinity_stride"}, stages.propagation.a2gnn);
    ``boundary_features`` adds IRNet's weighted boundary features (the GCN's node features)."""
    if isinstance(model, IRNet):
        if boundary_features:
            return infer_boundary_features(model, rgb, device)
        return {"boundary": infer_boundary(model, rgb, device)}
    if getattr(model, "window_graph", False):
        return _a2gnn().infer_window_graph(model, rgb, device)
    if isinstance(model, AffinityNet):
        return {"features": infer_features(model, rgb, device)}
    raise TypeError(f"no affinity inference for {type(model).__name__}; expected IRNet or AffinityNet")


def affinity_net_inputs(model: torch.nn.Module, device: torch.device,
                        boundary_features: bool = False) -> Callable[[np.ndarray, Sequence[int]], dict]:
    """``inputs(rgb, keys)`` for the propagation step: what the net gives for one image (boundary, features or
    window graph; ``boundary_features`` for WSGCN's node features)."""
    def inputs(rgb: np.ndarray, keys: Sequence[int]) -> dict:
        with torch.no_grad():
            return infer_affinity_input(model, rgb, device, boundary_features=boundary_features)
    return inputs

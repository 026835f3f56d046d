"""A2GNN's affinity CNN (Zhang et al., TPAMI 2021, ``zbf1991/A2GNN``): ``TrainAffinity.affinity_method = a2gnn``.

AffinityNet's embedding head scored over a dense square window of radius r (3 for image/point supervision, 4 for
box/scribble: ``TrainAffinity.window_radius``), a_ij = exp(-d_ij), d_ij = mean_c |f_i - f_j|. Pair labels over the
window from the seed map at the net's stride (positive = same label, ignore skipped); loss
1/4 bg+ + 1/4 fg+ + 1/2 neg + 3 x L_gated, L_gated = sum K_ij d_ij m_ij / sum m_ij with the RGB-XY kernel
(:func:`models.a2gnn.rgbxy_kernel`) and m_ij = both pixels inside the image (not crop padding). Its output, the
window graph (:func:`infer_window_graph`), is what A2GNN's GNN propagates over (stages/propagation/a2gnn.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from data.labelspace import IGNORE_INDEX
from models.a2gnn import A2GNNAffinityNet, block_centres, rgbxy_kernel, window_shifts, window_valid
from stages.affinity.train import build_backbone, padded_input, pair_losses
from stages.config import TrainAffinityConfig


def build(cfg: TrainAffinityConfig, cam_backbone_state: dict | None, pretrained: bool = True) -> A2GNNAffinityNet:
    """A2GNN's affinity CNN: AffinityNet's head over a square window of radius ``window_radius``."""
    if cfg.displacement:
        raise ValueError("TrainAffinity.displacement applies to affinity_method = irnet only")
    return A2GNNAffinityNet(build_backbone(cfg, cam_backbone_state, pretrained), window_radius=cfg.window_radius,
                            gated_weight=cfg.gated_weight, gated_sigma_rgb=cfg.gated_sigma_rgb,
                            gated_sigma_xy=cfg.gated_sigma_xy, freeze_backbone=cfg.freeze_backbone,
                            frozen_early=cfg.frozen_early_blocks)


def window_pair_masks(labels: Tensor, radius: int) -> dict[str, Tensor]:
    """P+_bg, P+_fg and P- over the square window of (B, h, w) label maps (255 = ignore): float (B, D, h, w).

    The centre pair counts (it is a positive pair of affinity 1, as in the reference); neighbours off the grid
    are ignored."""
    labels = labels.long()
    centre = labels[:, None]
    partner = torch.stack(window_shifts(labels, radius, fill=IGNORE_INDEX), 1)
    valid = (centre != IGNORE_INDEX) & (partner != IGNORE_INDEX)
    same = valid & (partner == centre)
    return {"bg": (same & (centre == 0)).float(), "fg": (same & (centre != 0)).float(),
            "neg": (valid & (partner != centre)).float()}


def gated_penalty(distance: Tensor, images: Tensor, stride: int, radius: int, sigma_rgb: float = 0.1,
                  sigma_xy: float = 6.0) -> Tensor:
    """A2GNN's RGB-XY gated smoothness on the learned feature distances d (B, D, h, w):
    sum K_ij d_ij m_ij / sum m_ij, m = both pixels inside the image and on the grid.

    ``images`` (B, 3, H, W) are the normalised crops; crop padding is exactly 0 in all three channels (a real
    pixel never is: the ImageNet mean is not a whole 8-bit value), which tells "inside" apart.
    """
    grid = tuple(distance.shape[-2:])
    with torch.no_grad():
        rgb = F.interpolate(images, size=grid, mode="bilinear", align_corners=False)
        kernel = rgbxy_kernel(rgb, radius, sigma_rgb, sigma_xy)
        inside = block_centres((images != 0).any(1).float(), grid, stride)            # (B, h, w)
        partner = torch.stack(window_shifts(inside, radius), 1)                         # 0 off the grid
        both = inside[:, None] * partner
    return (kernel * distance * both).sum() / both.sum().clamp(min=1)


def affinity_loss(model: A2GNNAffinityNet, images: Tensor, labels: Tensor) -> tuple[Tensor, dict, dict]:
    """(loss, parts, pair masks) of one batch: 1/4 bg+ + 1/4 fg+ + 1/2 neg + gated_weight x L_gated.

    ``labels`` (B, h, w) are the seeds at the net's stride (255 = ignore); the window radius and the gated
    penalty's settings come from the model (``TrainAffinity.window_radius``, ``gated_*``)."""
    radius = model.window_radius
    out = model.window_outputs(images)
    if tuple(labels.shape[-2:]) != tuple(out["affinity"].shape[-2:]):
        raise ValueError(f"label grid {tuple(labels.shape[-2:])} does not match the network's output grid "
                         f"{tuple(out['affinity'].shape[-2:])} for {tuple(images.shape[-2:])} inputs; pick "
                         f"TrainAffinity.crop_size as a multiple of {model.label_stride}")
    masks = window_pair_masks(labels, radius)
    parts = pair_losses(out["affinity"], masks)
    parts["gated"] = gated_penalty(out["distance"], images, model.label_stride, radius, model.gated_sigma_rgb,
                                   model.gated_sigma_xy)
    loss = parts["bg"] / 4 + parts["fg"] / 4 + parts["neg"] / 2 + model.gated_weight * parts["gated"]
    return loss, parts, masks


@torch.no_grad()
def infer_window_graph(model: A2GNNAffinityNet, rgb: np.ndarray, device: torch.device) -> dict[str, np.ndarray]:
    """The GNN's inputs for one image: {"window_affinity": (D, h, w) a_ij (0 off the grid), "node_features":
    (F, h, w) the concatenated taps, "affinity_stride": s} on the grid h = ceil(H/s), w = ceil(W/s) of the image
    zero-padded to a multiple of s (the reference's padding)."""
    model.eval()
    height, width = rgb.shape[:2]
    stride = model.label_stride
    out = model.window_outputs(padded_input(rgb, stride, device), node_features=True)
    grid = (math.ceil(height / stride), math.ceil(width / stride))
    affinity = out["affinity"][0, :, :grid[0], :grid[1]] * window_valid(*grid, model.window_radius, device)
    return {"window_affinity": affinity.float().cpu().numpy(),
            "node_features": out["node_features"][0, :, :grid[0], :grid[1]].float().cpu().numpy(),
            "affinity_stride": np.asarray(stride)}

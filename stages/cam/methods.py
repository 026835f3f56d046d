"""Registry of CAM methods: name -> builder of a network with ``training_loss``, ``param_groups`` and ``cam``.

A model's ``cam_normalization`` attribute tells make_cam how to normalise the summed multi-scale maps.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from models.cam import CAMNet
from models.registry import Registry
from models.resnet import create_backbone
from models.seam import SEAMNet
from stages.config import TrainCAMConfig

CAM_METHODS: Registry = Registry("CAM method")


@CAM_METHODS.register("cam")
def build_cam(cfg: TrainCAMConfig, num_classes: int, pretrained: bool = True) -> nn.Module:
    """IRN's CAM network. ``pretrained=False`` skips loading ImageNet weights (inference loads ours)."""
    backbone = create_backbone(cfg.backbone, strides=cfg.strides,
                               pretrained=cfg.pretrained if pretrained and cfg.pretrained else None)
    return CAMNet(backbone, num_classes, freeze_bn=cfg.freeze_bn, frozen_stages=cfg.frozen_stages)


@CAM_METHODS.register("seam")
def build_seam(cfg: TrainCAMConfig, num_classes: int, pretrained: bool = True) -> nn.Module:
    """SEAM on ResNet-38 (``resnet38``, ``resnet38_mini``; ``cfg.strides`` does not apply), or, for CPU runs that
    share a pretrained ``resnet_mini``, on a ResNet whose last three stages keep one stride (conv4..conv6)."""
    weights = cfg.pretrained if pretrained and cfg.pretrained else None
    if cfg.backbone.startswith("resnet38"):
        backbone = create_backbone(cfg.backbone, pretrained=weights)
    else:
        if tuple(cfg.strides[2:]) != (1, 1):
            raise ValueError(f"TrainCAM.strides = {cfg.strides}: SEAM on a ResNet needs its last two strides 1, "
                             "so the PCM's three taps share one grid")
        backbone = create_backbone(cfg.backbone, strides=cfg.strides, pretrained=weights)
    return SEAMNet(backbone, num_classes, freeze_bn=cfg.freeze_bn, frozen_stages=cfg.frozen_stages,
                   rescale=cfg.seam_rescale, ecr_top=cfg.seam_ecr_top, min_pool=cfg.seam_min_pool)


def build_cam_model(cfg: TrainCAMConfig, num_classes: int, pretrained: bool = True) -> nn.Module:
    return CAM_METHODS.get(cfg.cam_method)(cfg, num_classes, pretrained=pretrained)


CHECKPOINT = "model.pt"


def load_cam_model(cfg: TrainCAMConfig, num_classes: int, directory: str | os.PathLike,
                   device: torch.device) -> torch.nn.Module:
    model = build_cam_model(cfg, num_classes, pretrained=False)
    path = Path(directory) / CHECKPOINT
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.to(device).eval()

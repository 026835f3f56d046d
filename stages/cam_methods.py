"""Registry of CAM methods: name -> builder of a network with ``forward`` (logits) and ``cam``."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from models.cam import CAMNet
from models.registry import Registry
from models.resnet import create_backbone
from stages.config import TrainCAMConfig

CAM_METHODS: Registry = Registry("CAM method")


@CAM_METHODS.register("cam")
def build_cam(cfg: TrainCAMConfig, num_classes: int, pretrained: bool = True) -> nn.Module:
    """IRN's CAM network. ``pretrained=False`` skips loading ImageNet weights (inference loads ours)."""
    backbone = create_backbone(cfg.backbone, strides=cfg.strides,
                               pretrained=cfg.pretrained if pretrained and cfg.pretrained else None)
    return CAMNet(backbone, num_classes, freeze_bn=cfg.freeze_bn, frozen_stages=cfg.frozen_stages)


def build_cam_model(cfg: TrainCAMConfig, num_classes: int, pretrained: bool = True) -> nn.Module:
    return CAM_METHODS.get(cfg.cam_method)(cfg, num_classes, pretrained=pretrained)


CHECKPOINT = "model.pt"


def load_cam_model(cfg: TrainCAMConfig, num_classes: int, directory: str | os.PathLike,
                   device: torch.device) -> torch.nn.Module:
    model = build_cam_model(cfg, num_classes, pretrained=False)
    path = Path(directory) / CHECKPOINT
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.to(device).eval()

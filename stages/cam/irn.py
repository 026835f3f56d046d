"""IRN's CAM network (Ahn et al., CVPR 2019, ``jiwoon-ahn/irn``): ``TrainCAM.cam_method = cam``."""

from __future__ import annotations

from torch import nn

from models.cam import CAMNet
from models.resnet import create_backbone
from stages.config import TrainCAMConfig


def build(cfg: TrainCAMConfig, num_classes: int, pretrained: bool = True) -> nn.Module:
    """IRN's CAM network. ``pretrained=False`` skips loading ImageNet weights (inference loads ours)."""
    backbone = create_backbone(cfg.backbone, strides=cfg.strides,
                               pretrained=cfg.pretrained if pretrained and cfg.pretrained else None)
    return CAMNet(backbone, num_classes, freeze_bn=cfg.freeze_bn, frozen_stages=cfg.frozen_stages)

"""SEAM (Wang et al., CVPR 2020, ``YudeWang/SEAM``): ``TrainCAM.cam_method = seam``."""

from __future__ import annotations

from torch import nn

from models.resnet import create_backbone
from models.seam import SEAMNet
from stages.config import TrainCAMConfig


def build(cfg: TrainCAMConfig, num_classes: int, pretrained: bool = True) -> nn.Module:
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

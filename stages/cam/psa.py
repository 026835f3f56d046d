"""PSA's classification network (Ahn & Kwak, CVPR 2018, ``jiwoon-ahn/psa``): ``TrainCAM.cam_method = psa``."""

from __future__ import annotations

from models.cam import PSACAMNet
from models.resnet import create_backbone
from stages.config import TrainCAMConfig


def build(cfg: TrainCAMConfig, num_classes: int, pretrained: bool = True) -> PSACAMNet:
    """PSA's CAM net on ResNet-38 (``resnet38``, ``resnet38_mini``; ``cfg.strides`` does not apply)."""
    if not cfg.backbone.startswith("resnet38"):
        raise ValueError(f"TrainCAM.cam_method = psa needs a ResNet-38 backbone (resnet38, resnet38_mini), "
                         f"got {cfg.backbone!r}")
    backbone = create_backbone(cfg.backbone, pretrained=cfg.pretrained if pretrained and cfg.pretrained else None)
    return PSACAMNet(backbone, num_classes, freeze_bn=cfg.freeze_bn, frozen_stages=cfg.frozen_stages)

"""A single-label image classifier: backbone, global average pooling, linear head (ImageNet-style)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ImageClassifier(nn.Module):
    """Any backbone with ``taps(x)`` and ``tap_channels``; the head reads the last tap.

    Used to pretrain backbones on synthetic one-object images: only ``backbone.state_dict()`` is kept,
    in the backbone's own (torchvision-compatible) key layout, so it loads wherever ImageNet weights do.
    """

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.tap_channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone.taps(x)[-1]
        return self.fc(F.adaptive_avg_pool2d(features, 1).flatten(1))

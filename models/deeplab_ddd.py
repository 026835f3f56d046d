"""DeepLab-v3 with DDD's learned grid CRF trained end to end (``deeplabv3_ddd``).

A module of its own (listed in ``models.segmenters.SEGMENTERS``) so that the DDD solver (:mod:`models.ddd`) enters
the keys of the stages that train or run this model only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.ddd import DDDOptions, PairwiseHead, solve
from models.deeplab import DeepLabV3, MultiScaleInputs, head_width, v3_backbone
from models.resnet import ResNet


class DeepLabV3DDD(DeepLabV3):
    """:class:`DeepLabV3` whose logits are DDD's: unary = the classifier, pairwise = :class:`models.ddd.PairwiseHead`
    on the same ASPP features, then the CRF's sum of copy marginals."""

    def __init__(self, backbone: ResNet, num_classes: int, options: DDDOptions | None = None,
                 rates: Sequence[int] = (6, 12, 18), freeze_bn: bool = True):
        super().__init__(backbone, num_classes, rates, freeze_bn)
        self.options = options = options or DDDOptions()
        self.pairwise = PairwiseHead(head_width(backbone), num_classes, options.distances)

    def head_modules(self) -> list[nn.Module]:
        return [self.aspp, self.classifier, self.pairwise]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.aspp(self.backbone(x)[-1])
        return solve(self.classifier(features), self.pairwise(features), self.options)


def deeplabv3_ddd(backbone: str, num_classes: int, pretrained: str | None = None, freeze_bn: bool = True,
                  msc: bool = False, output_stride: int = 0, ddd: DDDOptions | dict | None = None) -> nn.Module:
    """Output stride 16 (reference) or 8; ``ddd`` the solver's knobs, as options or their fields (default: the
    reference's)."""
    options = DDDOptions(**ddd) if isinstance(ddd, dict) else ddd
    net = DeepLabV3DDD(v3_backbone("deeplabv3_ddd", backbone, output_stride, pretrained), num_classes,
                       options, freeze_bn=freeze_bn)
    return MultiScaleInputs(net) if msc else net

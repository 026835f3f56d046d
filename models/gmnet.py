"""GMNet's part segmenter (Michieli et al., ECCV 2020): DeepLab-v3+ conditioned on an object softmax.

A module of its own (listed in ``models.segmenters.SEGMENTERS``) so that editing it changes the keys of the part
branch only, never those of the DeepLabs it builds on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.deeplab import ConcatASPP, DeepLabV3Plus, head_width
from models.resnet import ResNet, create_backbone

CONDITIONING_WIDTHS = (128, 256, 512, 1024, 1024)  # GMNet's simple_net conv1..conv5 at full width


class ConditioningNet(nn.Module):
    """GMNet's class-conditioning CNN ("simple_net") on the object softmax at image resolution.

    conv1 7x7/2, conv2 7x7/1, max-pool 3x3/2, conv3 5x5/2, conv4 3x3/1, conv5 3x3/2 (total stride 16), each
    conv + BN + ReLU with He-uniform init, widths 128/256/512/1024/1024 x ``mult``. Returns the taps in ASPP
    branch order: conv5 (1x1 branch), conv3 (rate 6), conv2 (rate 12), conv1 (rate 18). Symmetric k//2
    padding gives TF "SAME"'s output sizes (not its asymmetric split for even inputs).
    """

    def __init__(self, in_channels: int, mult: float = 1.0):
        super().__init__()
        w1, w2, w3, w4, w5 = (max(4, round(c * mult)) for c in CONDITIONING_WIDTHS)
        self.conv1 = _strided_conv_bn_relu(in_channels, w1, 7, 2)
        self.conv2 = _strided_conv_bn_relu(w1, w2, 7, 1)
        self.conv3 = _strided_conv_bn_relu(w2, w3, 5, 2)
        self.conv4 = _strided_conv_bn_relu(w3, w4, 3, 1)
        self.conv5 = _strided_conv_bn_relu(w4, w5, 3, 2)
        self.tap_channels = (w5, w3, w2, w1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")

    def forward(self, maps: torch.Tensor) -> list[torch.Tensor]:
        c1 = self.conv1(maps)
        c2 = self.conv2(c1)
        c3 = self.conv3(F.max_pool2d(c2, 3, stride=2, padding=1))
        c5 = self.conv5(self.conv4(c3))
        return [c5, c3, c2, c1]


def _strided_conv_bn_relu(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class GMNet(DeepLabV3Plus):
    """DeepLab-v3+ conditioned on an object softmax (GMNet, Michieli et al. ECCV 2020): the conditioning net's
    taps, resized (bilinear) to the ASPP grid, are concatenated in front of the 1x1 / rate-6 / rate-12 / rate-18
    branches (conv5 / conv3 / conv2 / conv1), before the fusing 1x1; nothing enters at stride 4.
    ``forward(x, objects)``: ``objects`` (B, num_objects, H, W) at the image's size.

    ``cond_stride`` (ours; GMNet: 1) average-pools the object maps by that factor before the conditioning net:
    every tap ends resized to the ASPP grid (stride 16), so the maps' detail below it is lost anyway, while the
    net's 7x7 layers at half the image's size cost a small backbone more than its own step (bench.gm_loss)."""

    def __init__(self, backbone: ResNet, num_classes: int, num_objects: int, rates: Sequence[int] = (6, 12, 18),
                 freeze_bn: bool = True, cond_mult: float | None = None, cond_stride: int = 1):
        super().__init__(backbone, num_classes, rates, freeze_bn)
        if cond_stride < 1:
            raise ValueError(f"cond_stride must be at least 1, got {cond_stride}")
        self.cond_stride = cond_stride
        width = head_width(backbone)
        self.conditioning = ConditioningNet(num_objects, width / 256 if cond_mult is None else cond_mult)
        self.aspp = ConcatASPP(backbone.channels[-1], width, rates, extra=self.conditioning.tap_channels)
        self.num_objects = num_objects

    def head_modules(self) -> list[nn.Module]:
        return [*super().head_modules(), self.conditioning]

    def forward(self, x: torch.Tensor, objects: torch.Tensor | None = None) -> torch.Tensor:
        if objects is None or objects.shape[1] != self.num_objects or objects.shape[-2:] != x.shape[-2:]:
            got = None if objects is None else tuple(objects.shape)
            raise ValueError(f"GMNet needs object maps (B, {self.num_objects}, {x.shape[-2]}, {x.shape[-1]}), "
                             f"got {got}")
        feats = self.backbone(x)
        grid = feats[-1].shape[-2:]
        if self.cond_stride > 1:
            objects = F.avg_pool2d(objects, self.cond_stride, ceil_mode=True, count_include_pad=False)
        taps = [F.interpolate(t, size=grid, mode="bilinear", align_corners=False) if t.shape[-2:] != grid else t
                for t in self.conditioning(objects)]
        return self.decode(self.aspp(feats[-1], taps), feats[0])


def gmnet(backbone: str, num_classes: int, pretrained: str | None = None, freeze_bn: bool = True,
          msc: bool = False, num_objects: int | None = None, cond_mult: float | None = None,
          cond_stride: int = 1) -> nn.Module:
    """DeepLab-v3+ (as ``deeplabv3plus``) conditioned on ``num_objects`` object maps; ``cond_mult`` scales the
    conditioning widths (default: the head width / 256, 1/4 for ``resnet_mini``); ``cond_stride`` pools the
    maps before the conditioning net (1: GMNet)."""
    if num_objects is None:
        raise ValueError("gmnet needs num_objects (the object maps it is conditioned on): it is the part "
                         "segmenter of TrainPartSegmentation")
    if msc:
        raise ValueError("gmnet does not take msc (its object maps would need rescaling with the input)")
    return GMNet(create_backbone(backbone, strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2), pretrained=pretrained),
                 num_classes, num_objects, freeze_bn=freeze_bn, cond_mult=cond_mult, cond_stride=cond_stride)

"""DeepLab segmenters for the retraining stage (listed in ``models.segmenters.SEGMENTERS``).

- ``deeplabv2``: a dilated ResNet at output stride 8 (layer3 dilation 2, layer4 dilation 4) and an ASPP
  that **sums** four 3x3 classifiers with dilation 6/12/18/24 (deeplab-pytorch's DeepLabV2). Optionally
  wrapped in :class:`MultiScaleInputs` (MSC: the net on the input and on 0.5x / 0.75x copies, pixel-wise max).
- ``deeplabv3plus``: output stride 16 (layer4 dilation 2), an ASPP of 1x1 + three dilated 3x3 (6/12/18) +
  image pooling, concatenated and fused, then a decoder that joins the stride-4 layer1 features.
- ``gmnet`` (:mod:`models.gmnet`): ``deeplabv3plus`` whose ASPP branches also receive GMNet's conditioning CNN on
  an object softmax (the part segmenter of ``stages.parts``; ``forward(x, objects)``).
- ``deeplabv3``: the same ASPP and a 1x1 classifier, at output stride 16 (the DDD reference's baseline) or 8.
- ``deeplabv3_ddd`` (:mod:`models.deeplab_ddd`): ``deeplabv3`` whose classifier gives DDD's unary potentials,
  plus DDD's pairwise head on the ASPP features and the dual-decomposition CRF (:mod:`models.ddd`) on the logits'
  grid, trained end to end (taconite/DDD-Differentiable-Dual-Decomposition ``seg_aspp_resnet``). Its classifier
  has the plain model's key, so a trained ``deeplabv3`` initialises it (``init_checkpoint``).

Backbones come from ``models.resnet`` in torchvision's key layout, so an ImageNet ``.pth`` loads into
``backbone.*``. Head widths are 256 as in the references for full-size ResNets, and half the last stage's
channels for narrow ones (``resnet_mini``: 64), which keeps the head from dwarfing a CPU-sized backbone.

Every model returns logits at its output stride; ``param_groups`` gives deeplab-pytorch's learning-rate
groups (backbone 1x, head weights 10x, head biases 20x without weight decay, BatchNorm not optimised
when frozen). ``rates`` replaces a model's dilation rates: ``deeplabv2`` with ``(12,)`` is DeepLab-LargeFOV's
single dilation-12 classifier (hustvl/DGCN's ``layer5``). Frozen BatchNorm (``freeze_bn``) keeps its affine
parameters out of the optimiser and normalises with the pretrained running statistics, or, with
``bn_batch_stats``, with each training batch's statistics (updating the running ones, used in eval), as
hustvl/DGCN trains: affine ``requires_grad = False``, the net in train mode.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.norm import batchnorm_eval
from models.resnet import ResNet, create_backbone


def head_width(backbone: ResNet) -> int:
    return min(256, backbone.channels[-1] // 2)


class _Segmenter(nn.Module):
    """Shared by both DeepLabs: frozen BN handling and the LR groups."""

    backbone: ResNet

    def __init__(self, freeze_bn: bool, bn_batch_stats: bool = False):
        super().__init__()
        if bn_batch_stats and not freeze_bn:
            raise ValueError("bn_batch_stats freezes only the BN affine parameters; it needs freeze_bn")
        self.freeze_bn = freeze_bn
        self.bn_batch_stats = bn_batch_stats

    def train(self, mode: bool = True) -> _Segmenter:
        super().train(mode)
        if mode and self.freeze_bn and not self.bn_batch_stats:
            batchnorm_eval(self)  # deeplab-pytorch keeps the pretrained statistics throughout
        return self

    def head_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        """Backbone 1x; new layers' weights 10x and biases 20x (no decay); BN parameters not trained if frozen."""
        groups: list[dict] = [{"params": [], "lr_mult": 1.0}, {"params": [], "lr_mult": 10.0},
                              {"params": [], "lr_mult": 20.0, "decay": False}]
        head = {id(p) for m in self.head_modules() for p in m.parameters()}
        norm = {id(p) for m in self.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm))
                for p in m.parameters(recurse=False)}
        for name, p in self.named_parameters():
            if not p.requires_grad or (self.freeze_bn and id(p) in norm):
                continue
            if id(p) not in head:
                groups[0]["params"].append(p)
            elif name.endswith("bias"):
                groups[2]["params"].append(p)
            else:
                groups[1]["params"].append(p)
        return [g for g in groups if g["params"]]


class SumASPP(nn.Module):
    """DeepLab-v2's ASPP: parallel dilated 3x3 classifiers whose logits are summed."""

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int] = (6, 12, 18, 24)):
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r, bias=True)
                                      for r in rates)
        for conv in self.branches:
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(branch(x) for branch in self.branches)


class DeepLabV2(_Segmenter):
    def __init__(self, backbone: ResNet, num_classes: int, rates: Sequence[int] = (6, 12, 18, 24),
                 freeze_bn: bool = True, bn_batch_stats: bool = False):
        super().__init__(freeze_bn, bn_batch_stats)
        self.backbone = backbone
        self.aspp = SumASPP(backbone.channels[-1], num_classes, rates)
        self.output_stride = backbone.output_stride

    def head_modules(self) -> list[nn.Module]:
        return [self.aspp]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aspp(self.backbone(x)[-1])

    @property
    def node_feature_channels(self) -> int:
        return self.backbone.channels[0] + self.backbone.channels[2]

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and DGCN's graph-node features from one backbone pass: layer1 resized (bilinear, corners
        aligned, as hustvl/DGCN) to layer3's grid, which is the logits' grid at output stride 8, concatenated
        with layer3 (256 + 1024 = 1,280 channels for ResNet-101)."""
        feats = self.backbone(x)
        low = F.interpolate(feats[0], size=feats[2].shape[-2:], mode="bilinear", align_corners=True)
        return self.aspp(feats[-1]), torch.cat([low, feats[2]], 1)


def _conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (kernel // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ConcatASPP(nn.Module):
    """DeepLab-v3's ASPP: 1x1, three dilated 3x3 and image pooling, concatenated and fused by a 1x1.

    ``extra``: channels concatenated in front of each of the 1x1 and dilated branches (GMNet's conditioning taps,
    ``forward(x, extra=[...])``), which widen the fusing 1x1; the pooling branch gets none.
    """

    def __init__(self, in_channels: int, width: int, rates: Sequence[int] = (6, 12, 18),
                 extra: Sequence[int] = ()):
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn_relu(in_channels, width)] +
                                      [_conv_bn_relu(in_channels, width, 3, r) for r in rates])
        self.pool = _conv_bn_relu(in_channels, width)
        if extra and len(extra) != len(self.branches):
            raise ValueError(f"{len(extra)} extra inputs for {len(self.branches)} ASPP branches")
        self.fuse = _conv_bn_relu(width * (len(rates) + 2) + sum(extra), width)

    def forward(self, x: torch.Tensor, extra: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        pooled = self.pool(F.adaptive_avg_pool2d(x, 1))
        parts = [b(x) for b in self.branches]
        if extra:
            parts = [t for branch, tap in zip(parts, extra, strict=True) for t in (tap, branch)]
        return self.fuse(torch.cat([*parts, pooled.expand(-1, -1, *x.shape[-2:])], 1))


class DeepLabV3Plus(_Segmenter):
    def __init__(self, backbone: ResNet, num_classes: int, rates: Sequence[int] = (6, 12, 18),
                 freeze_bn: bool = True, bn_batch_stats: bool = False):
        super().__init__(freeze_bn, bn_batch_stats)
        self.backbone = backbone
        width = head_width(backbone)
        self.aspp = ConcatASPP(backbone.channels[-1], width, rates)
        low = max(8, width * 48 // 256)  # the reference reduces layer1 to 48 of 256
        self.reduce = _conv_bn_relu(backbone.channels[0], low)
        self.decoder = nn.Sequential(_conv_bn_relu(width + low, width, 3), _conv_bn_relu(width, width, 3),
                                     nn.Conv2d(width, num_classes, 1))
        self.output_stride = 4  # the decoder's resolution: layer1's grid

    def head_modules(self) -> list[nn.Module]:
        return [self.aspp, self.reduce, self.decoder]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x)
        return self.decode(self.aspp(feats[-1]), feats[0])

    def decode(self, high: torch.Tensor, layer1: torch.Tensor) -> torch.Tensor:
        low = self.reduce(layer1)
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.decoder(torch.cat([high, low], 1))


class DeepLabV3(_Segmenter):
    """ConcatASPP on the last stage and a 1x1 classifier (initialised N(0, 1e-3), zero bias, as the DDD reference's
    unary head); logits at the backbone's output stride."""

    def __init__(self, backbone: ResNet, num_classes: int, rates: Sequence[int] = (6, 12, 18),
                 freeze_bn: bool = True):
        super().__init__(freeze_bn)
        self.backbone = backbone
        width = head_width(backbone)
        self.aspp = ConcatASPP(backbone.channels[-1], width, rates)
        self.classifier = nn.Conv2d(width, num_classes, 1)
        nn.init.normal_(self.classifier.weight, 0.0, 1e-3)
        nn.init.zeros_(self.classifier.bias)
        self.output_stride = backbone.output_stride

    def head_modules(self) -> list[nn.Module]:
        return [self.aspp, self.classifier]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.aspp(self.backbone(x)[-1]))


class MultiScaleInputs(nn.Module):
    """deeplab-pytorch's MSC: logits of the input and of downscaled copies, fused by a pixel-wise max.

    In training it returns every output (1x, each scale, the max) so the loss covers all of them; in eval,
    the max only.
    """

    def __init__(self, base: _Segmenter, scales: Sequence[float] = (0.5, 0.75)):
        super().__init__()
        self.base = base
        self.scales = tuple(scales)
        self.output_stride = base.output_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        full = self.base(x)
        outputs = [full]
        for s in self.scales:
            small = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
            outputs.append(self.base(small))
        fused = torch.stack([F.interpolate(o, size=full.shape[-2:], mode="bilinear", align_corners=False)
                             for o in outputs]).amax(0)
        return [*outputs, fused] if self.training else fused

    def param_groups(self) -> list[dict]:
        return self.base.param_groups()


# output stride -> (strides, dilations) of the four ResNet stages
_STRIDES = {8: ((1, 2, 1, 1), (1, 1, 2, 4)), 16: ((1, 2, 2, 1), (1, 1, 1, 2))}


def _fixed_stride(name: str, output_stride: int, own: int) -> None:
    if output_stride not in (0, own):
        raise ValueError(f"{name} runs at output stride {own} only, got output_stride = {output_stride}")


def deeplabv2(backbone: str, num_classes: int, pretrained: str | None = None, freeze_bn: bool = True,
              msc: bool = False, rates: Sequence[int] = (6, 12, 18, 24), bn_batch_stats: bool = False,
              output_stride: int = 0) -> nn.Module:
    """Output stride 8: layer3 and layer4 keep their resolution with dilation 2 and 4."""
    _fixed_stride("deeplabv2", output_stride, 8)
    net = DeepLabV2(create_backbone(backbone, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), pretrained=pretrained),
                    num_classes, rates, freeze_bn=freeze_bn, bn_batch_stats=bn_batch_stats)
    return MultiScaleInputs(net) if msc else net


def deeplabv3plus(backbone: str, num_classes: int, pretrained: str | None = None, freeze_bn: bool = True,
                  msc: bool = False, rates: Sequence[int] = (6, 12, 18), bn_batch_stats: bool = False,
                  output_stride: int = 0) -> nn.Module:
    """Output stride 16 in the encoder (layer4 dilation 2), decoded at stride 4."""
    _fixed_stride("deeplabv3plus", output_stride, 16)
    net = DeepLabV3Plus(create_backbone(backbone, strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2),
                                        pretrained=pretrained), num_classes, rates, freeze_bn=freeze_bn,
                        bn_batch_stats=bn_batch_stats)
    return MultiScaleInputs(net) if msc else net


def v3_backbone(name: str, backbone: str, output_stride: int, pretrained: str | None) -> ResNet:
    if output_stride not in (0, *_STRIDES):
        raise ValueError(f"{name} runs at output stride 8 or 16 (0 = 16), got output_stride = {output_stride}")
    strides, dilations = _STRIDES[output_stride or 16]
    return create_backbone(backbone, strides=strides, dilations=dilations, pretrained=pretrained)


def deeplabv3(backbone: str, num_classes: int, pretrained: str | None = None, freeze_bn: bool = True,
              msc: bool = False, output_stride: int = 0) -> nn.Module:
    """Output stride 16 (the DDD reference) or 8."""
    net = DeepLabV3(v3_backbone("deeplabv3", backbone, output_stride, pretrained), num_classes, freeze_bn=freeze_bn)
    return MultiScaleInputs(net) if msc else net

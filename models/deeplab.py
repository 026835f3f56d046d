"""DeepLab segmenters for the retraining stage (registry: ``SEGMENTERS``).

- ``deeplabv2``: a dilated ResNet at output stride 8 (layer3 dilation 2, layer4 dilation 4) and an ASPP
  that **sums** four 3x3 classifiers with dilation 6/12/18/24 (deeplab-pytorch's DeepLabV2). Optionally
  wrapped in :class:`MultiScaleInputs` (MSC: the net on the input and on 0.5x / 0.75x copies, pixel-wise max).
- ``deeplabv3plus``: output stride 16 (layer4 dilation 2), an ASPP of 1x1 + three dilated 3x3 (6/12/18) +
  image pooling, concatenated and fused, then a decoder that joins the stride-4 layer1 features.
- ``gmnet``: ``deeplabv3plus`` whose ASPP branches also receive GMNet's conditioning CNN on an object
  softmax (the part segmenter of ``stages.parts``; ``forward(x, objects)``).
- ``deeplabv3``: the same ASPP and a 1x1 classifier, at output stride 16 (the DDD reference's baseline) or 8.
- ``deeplabv3_ddd``: ``deeplabv3`` whose classifier gives DDD's unary potentials, plus DDD's pairwise head on the
  ASPP features and the dual-decomposition CRF (:mod:`models.ddd`) on the logits' grid, trained end to end
  (taconite/DDD-Differentiable-Dual-Decomposition ``seg_aspp_resnet``). Its classifier has the plain model's key,
  so a trained ``deeplabv3`` initialises it (``init_checkpoint``).

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

from models.ddd import DDDOptions, PairwiseHead, solve
from models.norm import batchnorm_eval
from models.registry import Registry
from models.resnet import ResNet, create_backbone

SEGMENTERS: Registry = Registry("segmentation model")


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
    ``forward(x, objects)``: ``objects`` (B, num_objects, H, W) at the image's size."""

    def __init__(self, backbone: ResNet, num_classes: int, num_objects: int, rates: Sequence[int] = (6, 12, 18),
                 freeze_bn: bool = True, cond_mult: float | None = None):
        super().__init__(backbone, num_classes, rates, freeze_bn)
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
        taps = [F.interpolate(t, size=grid, mode="bilinear", align_corners=False) if t.shape[-2:] != grid else t
                for t in self.conditioning(objects)]
        return self.decode(self.aspp(feats[-1], taps), feats[0])


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


@SEGMENTERS.register("deeplabv2")
def deeplabv2(backbone: str, num_classes: int, pretrained: str | None = None, freeze_bn: bool = True,
              msc: bool = False, rates: Sequence[int] = (6, 12, 18, 24), bn_batch_stats: bool = False,
              output_stride: int = 0) -> nn.Module:
    """Output stride 8: layer3 and layer4 keep their resolution with dilation 2 and 4."""
    _fixed_stride("deeplabv2", output_stride, 8)
    net = DeepLabV2(create_backbone(backbone, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), pretrained=pretrained),
                    num_classes, rates, freeze_bn=freeze_bn, bn_batch_stats=bn_batch_stats)
    return MultiScaleInputs(net) if msc else net


@SEGMENTERS.register("deeplabv3plus")
def deeplabv3plus(backbone: str, num_classes: int, pretrained: str | None = None, freeze_bn: bool = True,
                  msc: bool = False, rates: Sequence[int] = (6, 12, 18), bn_batch_stats: bool = False,
                  output_stride: int = 0) -> nn.Module:
    """Output stride 16 in the encoder (layer4 dilation 2), decoded at stride 4."""
    _fixed_stride("deeplabv3plus", output_stride, 16)
    net = DeepLabV3Plus(create_backbone(backbone, strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2),
                                        pretrained=pretrained), num_classes, rates, freeze_bn=freeze_bn,
                        bn_batch_stats=bn_batch_stats)
    return MultiScaleInputs(net) if msc else net


@SEGMENTERS.register("gmnet")
def gmnet(backbone: str, num_classes: int, pretrained: str | None = None, freeze_bn: bool = True,
          msc: bool = False, num_objects: int | None = None, cond_mult: float | None = None) -> nn.Module:
    """DeepLab-v3+ (as ``deeplabv3plus``) conditioned on ``num_objects`` object maps; ``cond_mult`` scales the
    conditioning widths (default: the head width / 256, 1/4 for ``resnet_mini``)."""
    if num_objects is None:
        raise ValueError("gmnet needs num_objects (the object maps it is conditioned on): it is the part "
                         "segmenter of TrainPartSegmentation")
    if msc:
        raise ValueError("gmnet does not take msc (its object maps would need rescaling with the input)")
    return GMNet(create_backbone(backbone, strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2), pretrained=pretrained),
                 num_classes, num_objects, freeze_bn=freeze_bn, cond_mult=cond_mult)


def _v3_backbone(name: str, backbone: str, output_stride: int, pretrained: str | None) -> ResNet:
    if output_stride not in (0, *_STRIDES):
        raise ValueError(f"{name} runs at output stride 8 or 16 (0 = 16), got output_stride = {output_stride}")
    strides, dilations = _STRIDES[output_stride or 16]
    return create_backbone(backbone, strides=strides, dilations=dilations, pretrained=pretrained)


@SEGMENTERS.register("deeplabv3")
def deeplabv3(backbone: str, num_classes: int, pretrained: str | None = None, freeze_bn: bool = True,
              msc: bool = False, output_stride: int = 0, ddd: DDDOptions | None = None) -> nn.Module:
    """Output stride 16 (the DDD reference) or 8."""
    net = DeepLabV3(_v3_backbone("deeplabv3", backbone, output_stride, pretrained), num_classes, freeze_bn=freeze_bn)
    return MultiScaleInputs(net) if msc else net


@SEGMENTERS.register("deeplabv3_ddd")
def deeplabv3_ddd(backbone: str, num_classes: int, pretrained: str | None = None, freeze_bn: bool = True,
                  msc: bool = False, output_stride: int = 0, ddd: DDDOptions | None = None) -> nn.Module:
    """Output stride 16 (reference) or 8; ``ddd`` the solver's knobs (default: the reference's)."""
    net = DeepLabV3DDD(_v3_backbone("deeplabv3_ddd", backbone, output_stride, pretrained), num_classes,
                       ddd, freeze_bn=freeze_bn)
    return MultiScaleInputs(net) if msc else net


def create_segmenter(name: str, backbone: str, num_classes: int, pretrained: str | None = None,
                     freeze_bn: bool = True, msc: bool = False, rates: Sequence[int] | None = None,
                     bn_batch_stats: bool = False, output_stride: int = 0, ddd: DDDOptions | None = None,
                     **options) -> nn.Module:
    """A registered segmenter. Only what differs from the model's own choice is passed on, so each factory takes the
    options that apply to it: ``rates`` (None = the model's dilation rates) and ``bn_batch_stats`` (DeepLab-v2/v3+),
    ``output_stride`` (0 = the model's own), ``ddd`` (the CRF's knobs, ``deeplabv3_ddd``), and ``options``
    (``gmnet``: num_objects, cond_mult)."""
    extra = dict(options)
    if rates is not None:
        extra["rates"] = tuple(rates)
    if bn_batch_stats:
        extra["bn_batch_stats"] = True
    if output_stride:
        extra["output_stride"] = output_stride
    if ddd is not None:
        extra["ddd"] = ddd
    return SEGMENTERS.get(name)(backbone, num_classes, pretrained=pretrained, freeze_bn=freeze_bn, msc=msc, **extra)

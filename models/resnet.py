"""ResNets whose state-dict keys match torchvision's, so users load their ImageNet ``.pth`` files directly.

torchvision itself is optional (its registry wheel does not import beside the CPU torch build), so the
architecture is written here. Per-stage strides and dilations are arguments: IRN's CAM net is a
ResNet-50 with strides (1, 2, 2, 1) after the stem (output stride 16, last stage not downsampled).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from torch import nn

from models.registry import Registry
from models.resnet38 import ResNet38

BACKBONES: Registry = Registry("backbone")


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        # Stride on the 3x3 conv ("ResNet v1.5"), as torchvision does.
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet feature extractor: ``forward`` returns the output of every stage (layer1..layer4)."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int],
                 widths: Sequence[int] = (64, 128, 256, 512), strides: Sequence[int] = (1, 2, 2, 2),
                 dilations: Sequence[int] = (1, 1, 1, 1), stem_width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem_width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.inplanes = stem_width
        for i, (n, width, stride, dilation) in enumerate(zip(layers, widths, strides, dilations), start=1):
            setattr(self, f"layer{i}", self._make_layer(block, width, n, stride, dilation))
        self.channels = [w * block.expansion for w in widths]
        self.output_stride = 4 * math.prod(strides)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, n: int, stride: int, dilation: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        blocks = [block(self.inplanes, planes, stride, dilation, downsample)]
        self.inplanes = planes * block.expansion
        blocks += [block(self.inplanes, planes, 1, dilation) for _ in range(1, n)]
        return nn.Sequential(*blocks)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    @property
    def tap_channels(self) -> list[int]:
        """Channels of :meth:`taps`: the stem, then each stage."""
        return [self.conv1.out_channels, *self.channels]

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """IRNet's five feature taps x1..x5: the stem (after max-pool, stride 4), then layer1..layer4."""
        x = self.stem(x)
        return [x, *self._stages(x)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self._stages(self.stem(x))

    def _stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(x)
        return feats


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load a torchvision-layout state dict (``fc.*`` and extra keys ignored); returns the ignored keys.

    Fails, naming the file, when a backbone weight is missing or has the wrong shape.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: pretrained weights file is missing") from None
    except Exception as err:  # torch raises several types for corrupt or non-tensor pickles
        raise ValueError(f"{path}: cannot load as a weights-only state dict ({err})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict (parameter name -> tensor)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        layout = getattr(model, "key_layout",
                         "torchvision ResNet key layout (conv1.weight, layer1.0.conv1.weight, ...)")
        raise KeyError(f"{path}: {len(missing)} backbone weights missing, e.g. {missing[:4]}; expected {layout}")
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if wrong:
        raise ValueError(f"{path}: shape mismatch for {wrong[:4]} (e.g. {tuple(state[wrong[0]].shape)} vs "
                         f"{tuple(own[wrong[0]].shape)}): is this the right architecture?")
    model.load_state_dict({k: state[k] for k in own if k in state}, strict=False)
    return sorted(k for k in state if k not in own)


def create_backbone(name: str, strides: Sequence[int] | None = None, dilations: Sequence[int] | None = None,
                    pretrained: str | os.PathLike | None = None) -> ResNet | ResNet38:
    """Build a registered backbone, optionally loading ImageNet weights from a user-given path."""
    kwargs = {}
    if strides is not None:
        kwargs["strides"] = tuple(strides)
    if dilations is not None:
        kwargs["dilations"] = tuple(dilations)
    model = BACKBONES.get(name)(**kwargs)
    if pretrained:
        load_pretrained(model, pretrained)
    return model


@BACKBONES.register()
def resnet18(**kw) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), **kw)


@BACKBONES.register()
def resnet34(**kw) -> ResNet:
    return ResNet(BasicBlock, (3, 4, 6, 3), **kw)


@BACKBONES.register()
def resnet50(**kw) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), **kw)


@BACKBONES.register()
def resnet101(**kw) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 23, 3), **kw)


@BACKBONES.register()
def resnet_mini(**kw) -> ResNet:
    """A narrow ResNet-10 that trains from scratch on the CPU in minutes (embedded dataset, tests)."""
    kw.setdefault("strides", (1, 2, 1, 1))
    kw.setdefault("dilations", (1, 1, 2, 2))
    return ResNet(BasicBlock, (1, 1, 1, 1), widths=(16, 32, 64, 128), stem_width=16, **kw)


def _fixed_layout(name: str, strides: Sequence[int] | None, dilations: Sequence[int] | None) -> None:
    if strides is not None or dilations is not None:
        raise ValueError(f"backbone {name!r} has a fixed layout (output stride 8): strides/dilations do not apply; "
                         "ResNet-38 backbones are used by cam_method = seam, which does not pass them")


@BACKBONES.register()
def resnet38(strides: Sequence[int] | None = None, dilations: Sequence[int] | None = None) -> ResNet38:
    """PSA/SEAM's wide ResNet-38d (output stride 8); loads ``ilsvrc-cls_rna-a1_cls1000_ep-0001.pth``."""
    _fixed_layout("resnet38", strides, dilations)
    return ResNet38()


@BACKBONES.register()
def resnet38_mini(strides: Sequence[int] | None = None, dilations: Sequence[int] | None = None) -> ResNet38:
    """ResNet-38d topology with every width divided by 8, trainable from scratch on the CPU."""
    _fixed_layout("resnet38_mini", strides, dilations)
    return ResNet38(widths=(8, 16, 32, 64, 128, 256, 512))

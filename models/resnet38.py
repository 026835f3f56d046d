"""Wide ResNet-38 ("ResNet-38d", Wu et al.), the stride-8 backbone of PSA/AffinityNet, SEAM and A2GNN.

Pre-activation residual blocks (BN -> ReLU -> conv). The state-dict keys follow the converted ImageNet
weights that PSA and SEAM distribute (``ilsvrc-cls_rna-a1_cls1000_ep-0001.pth``), so that file loads as is::

    conv1a.weight                                   3x3 conv, 3 -> 64, stride 1
    b2, b2_1, b2_2                                  basic blocks 64 -> 128, the first with stride 2
    b3, b3_1, b3_2                                  128 -> 256, stride 2
    b4, b4_1 .. b4_5                                256 -> 512, stride 2 (output stride 8 from here)
    b5, b5_1, b5_2                                  512 -> 1024 (mid 512), dilation 2 (b5's first conv: 1)
    b6                                              bottleneck 1024 -> 2048, dilation 4, dropout 0.3
    b7                                              bottleneck 2048 -> 4096, dilation 4, dropout 0.5
    bn7.{weight,bias,running_mean,running_var}      final BN (then ReLU)

  basic block <b>:   <b>.bn_branch2a.*  <b>.conv_branch2a.weight (3x3, stride)
                     <b>.bn_branch2b1.* <b>.conv_branch2b1.weight (3x3)
                     <b>.conv_branch1.weight (1x1 projection; only when the shape changes)
  bottleneck <b>:    <b>.bn_branch2a.*  <b>.conv_branch2a.weight (1x1, out/4)
                     <b>.bn_branch2b1.* <b>.conv_branch2b1.weight (3x3, out/4 -> out/2)
                     <b>.bn_branch2b2.* <b>.conv_branch2b2.weight (1x1, out/2 -> out)
                     <b>.conv_branch1.weight (1x1 projection)

Every conv is bias-free. The ImageNet file has no ``num_batches_tracked`` entries and may carry a 1000-way
classifier; both are tolerated by :func:`models.resnet.load_pretrained`.

``resnet38_mini`` is the same topology with every width divided by 8, for CPU runs trained from scratch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.norm import batchnorm_eval


class PreActBlock(nn.Module):
    """Two 3x3 convs on BN-ReLU'd input; a 1x1 projection of the BN-ReLU'd input when the shape changes."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, stride: int = 1, first_dilation: int = 1,
                 dilation: int = 1):
        super().__init__()
        self.bn_branch2a = nn.BatchNorm2d(in_ch)
        self.conv_branch2a = nn.Conv2d(in_ch, mid_ch, 3, stride, padding=first_dilation, dilation=first_dilation,
                                       bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(mid_ch)
        self.conv_branch2b1 = nn.Conv2d(mid_ch, out_ch, 3, padding=dilation, dilation=dilation, bias=False)
        self.conv_branch1 = (nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)
                             if in_ch != out_ch or stride != 1 else None)

    def forward_with_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(block output, the block's BN-ReLU'd input): the latter is what PSA/SEAM tap as conv4/conv5."""
        pre = F.relu(self.bn_branch2a(x))
        shortcut = x if self.conv_branch1 is None else self.conv_branch1(pre)
        out = self.conv_branch2a(pre)
        out = self.conv_branch2b1(F.relu(self.bn_branch2b1(out)))
        return shortcut + out, pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_input(x)[0]


class PreActBottleneck(nn.Module):
    """1x1 (out/4) -> 3x3 (out/2) -> 1x1 (out) with spatial dropout before the last two convs."""

    def __init__(self, in_ch: int, out_ch: int, dilation: int, dropout: float):
        super().__init__()
        self.bn_branch2a = nn.BatchNorm2d(in_ch)
        self.conv_branch2a = nn.Conv2d(in_ch, out_ch // 4, 1, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(out_ch // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(out_ch // 4, out_ch // 2, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(out_ch // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(out_ch // 2, out_ch, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(in_ch, out_ch, 1, bias=False)

    def forward_with_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = F.relu(self.bn_branch2a(x))
        shortcut = self.conv_branch1(pre)
        out = self.conv_branch2a(pre)
        out = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(out))))
        out = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(out))))
        return shortcut + out, pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_input(x)[0]


# Stage name -> block attribute names, in order; frozen_stages = k freezes the first k entries.
STAGES = {
    "conv1a": ["conv1a"],
    "b2": ["b2", "b2_1", "b2_2"],
    "b3": ["b3", "b3_1", "b3_2"],
    "b4": ["b4"] + [f"b4_{i}" for i in range(1, 6)],
    "b5": ["b5", "b5_1", "b5_2"],
}


class ResNet38(nn.Module):
    """ResNet-38d feature extractor at output stride 8.

    ``taps(x)`` returns [conv4, conv5, conv6]: the BN-ReLU'd inputs of b5 and b6 and the bn7-ReLU output.
    :meth:`set_frozen` applies the PSA/SEAM recipe (BN on running statistics with frozen affine parameters;
    conv1a, then b2..b2_2, ... never updated).
    """

    output_stride = 8
    # Shown in load errors (models.resnet.load_pretrained) so users see which file layout is expected.
    key_layout = "PSA/SEAM ResNet-38d key layout (conv1a.weight, b2.bn_branch2a.weight, b6.conv_branch2b1.weight, ...)"

    def __init__(self, widths: Sequence[int] = (64, 128, 256, 512, 1024, 2048, 4096)):
        super().__init__()
        if len(widths) != 7:
            raise ValueError(f"ResNet38 needs 7 widths (conv1a, b2, b3, b4, b5, b6, b7), got {widths}")
        w1, w2, w3, w4, w5, w6, w7 = widths
        self.conv1a = nn.Conv2d(3, w1, 3, padding=1, bias=False)
        self.b2 = PreActBlock(w1, w2, w2, stride=2)
        self.b2_1 = PreActBlock(w2, w2, w2)
        self.b2_2 = PreActBlock(w2, w2, w2)
        self.b3 = PreActBlock(w2, w3, w3, stride=2)
        self.b3_1 = PreActBlock(w3, w3, w3)
        self.b3_2 = PreActBlock(w3, w3, w3)
        self.b4 = PreActBlock(w3, w4, w4, stride=2)
        for i in range(1, 6):
            setattr(self, f"b4_{i}", PreActBlock(w4, w4, w4))
        self.b5 = PreActBlock(w4, w4, w5, first_dilation=1, dilation=2)
        self.b5_1 = PreActBlock(w5, w4, w5, first_dilation=2, dilation=2)
        self.b5_2 = PreActBlock(w5, w4, w5, first_dilation=2, dilation=2)
        self.b6 = PreActBottleneck(w5, w6, dilation=4, dropout=0.3)
        self.b7 = PreActBottleneck(w6, w7, dilation=4, dropout=0.5)
        self.bn7 = nn.BatchNorm2d(w7)
        self.channels = [w4, w5, w7]
        self.freeze_bn = False
        self.frozen_stages = 0
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @property
    def tap_channels(self) -> list[int]:
        """Channels of :meth:`taps`: conv4, conv5, conv6."""
        return list(self.channels)

    def set_frozen(self, freeze_bn: bool, frozen_stages: int) -> ResNet38:
        """Freeze per PSA/SEAM: ``frozen_stages`` 1 = conv1a (PSA), 2 = conv1a + b2, b2_1, b2_2 (SEAM), up to 5."""
        if not 0 <= frozen_stages <= len(STAGES):
            raise ValueError(f"frozen_stages must be in 0..{len(STAGES)} for ResNet38, got {frozen_stages}")
        self.freeze_bn = freeze_bn
        self.frozen_stages = frozen_stages
        for stage in list(STAGES.values())[:frozen_stages]:
            for name in stage:
                for p in getattr(self, name).parameters():
                    p.requires_grad_(False)
        if freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    for p in m.parameters():
                        p.requires_grad_(False)
        self.train(self.training)
        return self

    def train(self, mode: bool = True) -> ResNet38:
        super().train(mode)
        if self.freeze_bn:
            batchnorm_eval(self)
        return self

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[conv4 (w4 ch), conv5 (w5 ch), conv6 (w7 ch)], all at stride 8."""
        stages = list(STAGES.values())
        x = self.conv1a(x)
        if self.frozen_stages == 1:
            x = x.detach()  # nothing before this point trains: skip its backward pass
        for k, stage in enumerate(stages[1:4], start=2):
            for name in stage:
                x = getattr(self, name)(x)
            if k == self.frozen_stages:
                x = x.detach()
        x, conv4 = self.b5.forward_with_input(x)
        x = self.b5_2(self.b5_1(x))
        if self.frozen_stages == 5:
            x = x.detach()
        x, conv5 = self.b6.forward_with_input(x)
        x = self.b7(x)
        conv6 = F.relu(self.bn7(x))
        return [conv4, conv5, conv6]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The final stride-8 features (conv6)."""
        return self.taps(x)[-1]

"""The CAM classification network (IRN's recipe): backbone, global average pooling, bias-free 1x1 head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.norm import batchnorm_eval
from models.resnet import ResNet
from models.resnet38 import ResNet38

SEAM_EPS = 1e-5


def max_norm(maps: torch.Tensor) -> torch.Tensor:
    """SEAM's per-channel min-max normalisation of ReLU'd maps (B, C, H, W) into [0, 1)."""
    maps = F.relu(maps)
    hi = maps.amax(dim=(2, 3), keepdim=True)
    lo = maps.amin(dim=(2, 3), keepdim=True)
    return F.relu(maps - lo - SEAM_EPS) / (hi - lo + SEAM_EPS)


class CAMNet(nn.Module):
    """Multi-label classifier whose 1x1 head, slid over the feature map, gives class activation maps.

    ``freeze_bn`` keeps every BatchNorm on its running statistics (IRN's FixedBatchNorm);
    ``frozen_stages`` = k stops gradients after the stem and the first k ResNet stages (IRN: 2).
    ``cam`` is ReLU'd per pass; make_cam divides the multi-scale sum by its max (``cam_normalization``).
    """

    cam_normalization = "max"

    def __init__(self, backbone: ResNet, num_classes: int, freeze_bn: bool = True, frozen_stages: int = 2):
        super().__init__()
        if not 0 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in 0..4, got {frozen_stages}")
        self.backbone = backbone
        self.classifier = nn.Conv2d(backbone.channels[-1], num_classes, 1, bias=False)
        self.freeze_bn = freeze_bn
        self.frozen_stages = frozen_stages
        frozen = [backbone.conv1, backbone.bn1] if frozen_stages > 0 else []
        frozen += [getattr(backbone, f"layer{i}") for i in range(1, frozen_stages + 1)]
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        x = b.stem(x)
        for i, layer in enumerate((b.layer1, b.layer2, b.layer3, b.layer4), start=1):
            x = layer(x)
            if i == self.frozen_stages:
                x = x.detach()
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, C): GAP then the linear head (equal to the head then GAP)."""
        pooled = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(pooled).flatten(1)

    def cam(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU'd class activation maps (B, C, h, w) at the backbone's output stride."""
        return F.relu(self.classifier(self.features(x)))

    def train(self, mode: bool = True) -> CAMNet:
        super().train(mode)
        if self.freeze_bn:
            batchnorm_eval(self)
        return self

    def param_groups(self, head_lr_mult: float = 10.0) -> list[dict]:
        """IRN's two groups: the backbone at the base LR, the new head at ``head_lr_mult`` x."""
        return [{"params": list(self.backbone.parameters()), "lr_mult": 1.0},
                {"params": list(self.classifier.parameters()), "lr_mult": head_lr_mult}]

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Multilabel soft-margin loss on the GAP logits; returns (loss, parts for the log)."""
        loss = F.multilabel_soft_margin_loss(self(images), labels)
        return loss, {"cls": loss.detach()}


def psa_param_groups(model: nn.Module, new_modules: list[nn.Module], head_lr_mult: float) -> list[dict]:
    """PSA's four groups (PSA, SEAM): pretrained weights 1x, pretrained biases 2x (no decay), new weights
    ``head_lr_mult`` x, new biases 2 * ``head_lr_mult`` x (no decay)."""
    new_ids = {id(p) for m in new_modules for p in m.parameters()}
    groups: dict[str, list] = {key: [] for key in ("old_w", "old_b", "new_w", "new_b")}
    for name, p in model.named_parameters():
        kind = "b" if name.endswith("bias") else "w"
        groups[("new_" if id(p) in new_ids else "old_") + kind].append(p)
    return [{"params": groups["old_w"], "lr_mult": 1.0, "decay": True},
            {"params": groups["old_b"], "lr_mult": 2.0, "decay": False},
            {"params": groups["new_w"], "lr_mult": head_lr_mult, "decay": True},
            {"params": groups["new_b"], "lr_mult": 2.0 * head_lr_mult, "decay": False}]


class PSACAMNet(nn.Module):
    """PSA's classification network (``jiwoon-ahn/psa`` resnet38_cls): ResNet-38, Dropout2d(0.5) on conv6, GAP and a
    bias-free 1x1 fc8 (Xavier); multilabel soft-margin loss. Its CAM is ReLU(fc8 applied to conv6) at stride 8,
    max-normalised after the multi-scale sum. BN and the first ``frozen_stages`` stages of ResNet-38 stay fixed
    (PSA: conv1a, b2, b2_1, b2_2 = 2)."""

    cam_normalization = "max"

    def __init__(self, backbone: ResNet38, num_classes: int, freeze_bn: bool = True, frozen_stages: int = 2):
        super().__init__()
        self.backbone = backbone.set_frozen(freeze_bn, frozen_stages)
        self.dropout = nn.Dropout2d(0.5)
        self.classifier = nn.Conv2d(backbone.tap_channels[-1], num_classes, 1, bias=False)
        nn.init.xavier_uniform_(self.classifier.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, C): dropout, GAP, fc8."""
        pooled = F.adaptive_avg_pool2d(self.dropout(self.backbone(x)), 1)
        return self.classifier(pooled).flatten(1)

    def cam(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.classifier(self.backbone(x)))

    def param_groups(self, head_lr_mult: float = 10.0) -> list[dict]:
        return psa_param_groups(self, [self.classifier], head_lr_mult)

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        loss = F.multilabel_soft_margin_loss(self(images), labels)
        return loss, {"cls": loss.detach()}

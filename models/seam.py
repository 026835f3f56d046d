"""SEAM (Wang et al., CVPR 2020): self-supervised equivariant attention on a ResNet-38 backbone.

The network is ResNet-38 -> Dropout2d(0.5) -> bias-free 1x1 head to 1 + C channels (channel 0 = background),
plus the Pixel Correlation Module (PCM), which refines the CAM by an affinity-weighted average over all
pixels. The PCM's inputs are detached, so its losses train only its three 1x1 projections; the backbone
and head learn from the classification and equivariance (ER) losses. Behaviour follows YudeWang/SEAM
``train_SEAM.py`` / ``infer_SEAM.py`` as described in shared/research/seam_a2gnn_dgcn.md section 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.cam import max_norm, psa_param_groups
from models.resnet import ResNet
from models.resnet38 import ResNet38

EPS = 1e-5


def keep_fg_max(maps: torch.Tensor) -> torch.Tensor:
    """Copy of ``maps`` (B, 1+C, H, W) whose fg channels keep only the per-pixel max (ties all kept); bg untouched."""
    fg = maps[:, 1:]
    fg = fg * (fg >= fg.amax(dim=1, keepdim=True))
    return torch.cat([maps[:, :1], fg], dim=1)


def min_pool_loss(fg_maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of ReLU over the ``fraction`` weakest pixels of the per-pixel max over classes (B, C, H, W)."""
    strongest = fg_maps.amax(dim=1).flatten(1)
    k = max(1, int(strongest.shape[1] * fraction))
    weakest = torch.topk(strongest, k, dim=1, largest=False).values
    return F.relu(weakest).mean()


def top_fraction_mean(errors: torch.Tensor, fraction: float) -> torch.Tensor:
    """OHEM-style mean of the largest ``fraction`` of each sample's entries (B, ...)."""
    flat = errors.flatten(1)
    k = max(1, int(flat.shape[1] * fraction))
    return torch.topk(flat, k, dim=1).values.mean()


class PixelCorrelationModule(nn.Module):
    """Refine a CAM with ReLU'd cosine affinities of detached low/mid-level features and the image.

    Affinity columns are normalised to sum to 1, so each output pixel is an affinity-weighted average of
    the (normalised, one-hot-max) input CAM over every pixel of the map.
    """

    def __init__(self, conv4_channels: int, conv5_channels: int, dim: int = 192):
        super().__init__()
        low, mid = dim // 3, 2 * dim // 3  # SEAM: 64 and 128 for a 192-d embedding
        self.f8_3 = nn.Conv2d(conv4_channels, low, 1, bias=False)
        self.f8_4 = nn.Conv2d(conv5_channels, mid, 1, bias=False)
        self.f9 = nn.Conv2d(low + mid + 3, dim, 1, bias=False)
        nn.init.kaiming_normal_(self.f8_3.weight)
        nn.init.kaiming_normal_(self.f8_4.weight)
        nn.init.xavier_uniform_(self.f9.weight, gain=4)

    @staticmethod
    def seed(cam: torch.Tensor) -> torch.Tensor:
        """The PCM's input (no gradient): max-normalised CAM, bg = 1 - max fg, fg keeps only its argmax."""
        with torch.no_grad():
            c = F.relu(cam.detach())
            c = F.relu(c - EPS) / (c.amax(dim=(2, 3), keepdim=True) + EPS)
            bg = 1 - c[:, 1:].amax(dim=1, keepdim=True)
            return keep_fg_max(torch.cat([bg, c[:, 1:]], dim=1))

    def affinity(self, image: torch.Tensor, conv4: torch.Tensor, conv5: torch.Tensor) -> torch.Tensor:
        """Column-normalised affinity (B, HW, HW) at the feature grid; no gradient reaches the backbone."""
        h, w = conv4.shape[-2:]
        small = F.interpolate(image, (h, w), mode="bilinear", align_corners=True)
        feats = torch.cat([small, F.relu(self.f8_3(conv4.detach())), F.relu(self.f8_4(conv5.detach()))], dim=1)
        f = self.f9(feats).flatten(2)
        f = f / (f.norm(dim=1, keepdim=True) + EPS)
        aff = F.relu(f.transpose(1, 2) @ f)
        return aff / (aff.sum(dim=1, keepdim=True) + EPS)

    def forward(self, cam: torch.Tensor, image: torch.Tensor, conv4: torch.Tensor,
                conv5: torch.Tensor) -> torch.Tensor:
        seed = self.seed(cam)
        aff = self.affinity(image, conv4, conv5)
        return (seed.flatten(2) @ aff).view_as(seed)


class SEAMNet(nn.Module):
    """SEAM's network with CAMNet's interface (``training_loss``, ``param_groups``, ``cam``).

    ``num_classes`` counts foreground classes; the head adds the background channel. ``cam(x)`` gives the
    PCM output's foreground channels at stride 8, summed over scales by make_cam in SEAM's order (resize to the
    input size with align_corners=True as ``forward``, then to the image size, mirror back after resizing:
    ``cam_upsampling = "seam"``), which then applies ReLU and per-class min-max normalisation
    (``cam_normalization = "minmax"``).
    """

    cam_normalization = "minmax"
    cam_upsampling = "seam"

    def __init__(self, backbone: ResNet38 | ResNet, num_classes: int, freeze_bn: bool = True, frozen_stages: int = 2,
                 rescale: float = 0.3, ecr_top: float = 0.2, min_pool: float = 0.25):
        super().__init__()
        for key, value in (("seam_rescale", rescale), ("seam_ecr_top", ecr_top), ("seam_min_pool", min_pool)):
            if not 0 < value <= 1:
                raise ValueError(f"TrainCAM.{key} must be in (0, 1], got {value}")
        if isinstance(backbone, ResNet38):
            self.backbone = backbone.set_frozen(freeze_bn, frozen_stages)
        elif freeze_bn or frozen_stages:
            raise ValueError("TrainCAM.freeze_bn/frozen_stages: SEAM freezes only ResNet-38 backbones; "
                             "on a ResNet backbone set freeze_bn = false and frozen_stages = 0")
        else:
            self.backbone = backbone
        # SEAM's conv4, conv5 and conv6 are a ResNet's last three stages (all at the same stride).
        conv4_ch, conv5_ch, conv6_ch = backbone.tap_channels[-3:]
        self.dropout = nn.Dropout2d(0.5)
        self.classifier = nn.Conv2d(conv6_ch, 1 + num_classes, 1, bias=False)
        nn.init.xavier_uniform_(self.classifier.weight)
        self.pcm = PixelCorrelationModule(conv4_ch, conv5_ch)
        self.rescale = rescale
        self.ecr_top = ecr_top
        self.min_pool = min_pool

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cam logits, PCM output), both (B, 1+C, h, w) at the stride-8 grid."""
        conv4, conv5, conv6 = self.backbone.taps(x)[-3:]
        cam = self.classifier(self.dropout(conv6))
        return cam, self.pcm(cam, x, conv4, conv5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cam, cam_rv) upsampled to the input size (bilinear, align_corners=True), as SEAM's network."""
        cam, cam_rv = self.maps(x)
        size = x.shape[-2:]
        return (F.interpolate(cam, size, mode="bilinear", align_corners=True),
                F.interpolate(cam_rv, size, mode="bilinear", align_corners=True))

    def cam(self, x: torch.Tensor) -> torch.Tensor:
        """Foreground channels of the PCM output (B, C, h, w), unnormalised, for multi-scale inference."""
        return self.maps(x)[1][:, 1:]

    def param_groups(self, head_lr_mult: float = 10.0) -> list[dict]:
        """SEAM's four groups: pretrained weights 1x, pretrained biases 2x (no decay), new weights
        ``head_lr_mult`` x, new biases 2 * ``head_lr_mult`` x (no decay). Trainable BN affine parameters
        (no freeze_bn) count as pretrained weights / biases."""
        return psa_param_groups(self, [self.classifier, self.pcm], head_lr_mult)

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """SEAM's loss on a Siamese pair (images, images rescaled by ``rescale``); returns (loss, parts)."""
        small = F.interpolate(images, scale_factor=self.rescale, mode="bilinear", align_corners=True)
        cam1, rv1 = self(images)
        cam2, rv2 = self(small)
        return seam_loss(cam1, rv1, cam2, rv2, labels, min_pool=self.min_pool, ecr_top=self.ecr_top)


def seam_loss(cam1: torch.Tensor, rv1: torch.Tensor, cam2: torch.Tensor, rv2: torch.Tensor, labels: torch.Tensor,
              min_pool: float, ecr_top: float) -> tuple[torch.Tensor, dict]:
    """SEAM's total loss from both branches' (cam, PCM output) at their input sizes; labels are fg multi-hot.

    L = (cls1 + cls2)/2 + (min1 + min2)/2 + ER + (ECR1 + ECR2), with no weights, as the reference.
    """
    b = labels.shape[0]
    y = torch.cat([labels.new_ones(b, 1), labels], dim=1)[:, :, None, None]
    cls1 = F.multilabel_soft_margin_loss(cam1.mean(dim=(2, 3))[:, 1:], labels)
    cls2 = F.multilabel_soft_margin_loss(cam2.mean(dim=(2, 3))[:, 1:], labels)
    min1 = min_pool_loss((rv1 * y)[:, 1:], min_pool)
    min2 = min_pool_loss((rv2 * y)[:, 1:], min_pool)
    # Both branches compared at the small branch's size.
    small = cam2.shape[-2:]
    c1 = F.interpolate(max_norm(cam1), small, mode="bilinear", align_corners=True) * y
    r1 = F.interpolate(max_norm(rv1), small, mode="bilinear", align_corners=True) * y
    c2 = max_norm(cam2) * y
    r2 = max_norm(rv2) * y
    er = (c1[:, 1:] - c2[:, 1:]).abs().mean()
    # ECR targets: background = 1 - max fg, fg one-hot at the per-pixel max, no gradient.
    with torch.no_grad():
        t1 = keep_fg_max(torch.cat([1 - c1[:, 1:].amax(dim=1, keepdim=True), c1[:, 1:]], dim=1))
        t2 = keep_fg_max(torch.cat([1 - c2[:, 1:].amax(dim=1, keepdim=True), c2[:, 1:]], dim=1))
    ecr1 = top_fraction_mean((t2 - r1).abs(), ecr_top)
    ecr2 = top_fraction_mean((t1 - r2).abs(), ecr_top)
    loss = (cls1 + cls2) / 2 + (min1 + min2) / 2 + er + (ecr1 + ecr2)
    parts = {"cls": (cls1 + cls2).detach() / 2, "min": (min1 + min2).detach() / 2, "er": er.detach(),
             "ecr": (ecr1 + ecr2).detach()}
    return loss, parts

"""Inter-pixel relation networks: PSA's AffinityNet and IRN's IRNet.

Both score the pixel pairs of a half disc (``models.pairs``) on a low-resolution grid. AffinityNet learns a
feature map f and scores a pair by exp(-mean_c |f_i - f_j|); IRNet learns a class-boundary map B and scores
a pair by 1 - max B along the line between the two pixels. A pair is indexed by its offset (dy, dx) and its
source pixel; sources are restricted to the window whose every partner lies inside the grid, as in the
references: rows [0, h - (r-1)) and columns [r-1, w - (r-1)).

Any backbone with ``taps(x)`` and ``tap_channels`` works for AffinityNet (it uses the last three taps);
IRNet needs the five ResNet taps (stem, layer1..layer4).
"""

from __future__ import annotations

import math
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from models.norm import batchnorm_eval
from models.pairs import half_disc_offsets, line_path

# ----------------------------------------------------------------------------------------- pair geometry


def source_window(height: int, width: int, radius: int) -> tuple[int, int]:
    """Rows and columns of source pixels whose radius-``radius`` partners all lie inside the grid."""
    rows, cols = height - (radius - 1), width - 2 * (radius - 1)
    if rows < 1 or cols < 1:
        raise ValueError(f"a {height}x{width} grid has no source pixel for pair radius {radius}: it needs at "
                         f"least {radius} rows and {2 * radius - 1} columns (raise TrainAffinity.crop_size or "
                         "lower TrainAffinity.radius)")
    return rows, cols


def pair_partners(grid: torch.Tensor, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sources, partners) of a (..., h, w) grid: sources (..., 1, hs, ws), partners (..., D, hs, ws)."""
    h, w = grid.shape[-2:]
    rows, cols = source_window(h, w, radius)
    c0 = radius - 1
    sources = grid[..., 0:rows, c0:c0 + cols].unsqueeze(-3)
    partners = torch.stack([grid[..., dy:dy + rows, c0 + dx:c0 + dx + cols]
                            for dy, dx in half_disc_offsets(radius)], dim=-3)
    return sources, partners


def feature_affinity(features: torch.Tensor, radius: int) -> torch.Tensor:
    """AffinityNet's a_ij = exp(-mean_c |f_i - f_j|) for (B, C, h, w) features -> (B, D, hs, ws)."""
    h, w = features.shape[-2:]
    rows, cols = source_window(h, w, radius)
    c0 = radius - 1
    source = features[:, :, 0:rows, c0:c0 + cols]
    # One offset at a time keeps memory at B*C*hs*ws instead of B*C*D*hs*ws.
    dists = [(source - features[:, :, dy:dy + rows, c0 + dx:c0 + dx + cols]).abs().mean(1)
             for dy, dx in half_disc_offsets(radius)]
    return torch.exp(-torch.stack(dists, dim=1))


@cache
def _path_tables(radius: int) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[list[int], list[int]], ...]]:
    """Every lattice point any path visits, and per path length: (offset indices, their path point indices)."""
    offsets = half_disc_offsets(radius)
    points: dict[tuple[int, int], int] = {}
    paths = []
    for dy, dx in offsets:
        paths.append([points.setdefault(p, len(points)) for p in line_path(dy, dx)])
    by_length: dict[int, tuple[list[int], list[int]]] = {}
    for index, path in enumerate(paths):
        which, flat = by_length.setdefault(len(path), ([], []))
        which.append(index)
        flat.extend(path)
    return tuple(points), tuple(by_length[n] for n in sorted(by_length))


def boundary_affinity(boundary: torch.Tensor, radius: int) -> torch.Tensor:
    """IRNet's a_ij = 1 - max of B along the line path of each pair, for (B, h, w) maps -> (B, D, hs, ws)."""
    h, w = boundary.shape[-2:]
    rows, cols = source_window(h, w, radius)
    c0 = radius - 1
    points, groups = _path_tables(radius)
    shifted = torch.stack([boundary[:, y:y + rows, c0 + x:c0 + x + cols] for y, x in points], dim=1)
    n_offsets = len(half_disc_offsets(radius))
    out = boundary.new_empty(boundary.shape[0], n_offsets, rows, cols)
    # Paths of equal length are gathered together (as IRN does), so there is one max per length.
    for which, flat in groups:
        index = torch.as_tensor(flat, device=boundary.device)
        gathered = shifted.index_select(1, index).unflatten(1, (len(which), -1))
        out[:, which] = gathered.amax(2)
    return 1 - out


# ----------------------------------------------------------------------------------------------- helpers


def _upsample_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling by the integer factor that covers ``size``, then a top-left crop (IRN's way),
    so odd input sizes and any output stride work."""
    factor = max(math.ceil(size[0] / x.shape[-2]), math.ceil(size[1] / x.shape[-1]))
    if factor > 1:
        x = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    return x[..., :size[0], :size[1]]


def _split_decay(params: list[tuple[str, nn.Parameter]]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weights, biases) of trainable parameters: 1-D tensors (biases, norm affines) take no decay."""
    trainable = [(n, p) for n, p in params if p.requires_grad]
    weights = [p for n, p in trainable if p.ndim > 1]
    biases = [p for n, p in trainable if p.ndim <= 1]
    return weights, biases


# ------------------------------------------------------------------------------------------- AffinityNet


class AffinityNet(nn.Module):
    """PSA's AffinityNet: a 3-level 1x1 ELU head (64/128/256 -> 448 channels) on the last three taps.

    ``freeze_backbone`` stops the backbone training altogether; otherwise it trains with every BatchNorm on
    its running statistics and fixed affine parameters when ``freeze_bn`` (PSA's recipe), and without its
    :func:`early_blocks` when ``frozen_early`` (PSA's and A2GNN's ``not_training`` list).
    """

    head_widths = (64, 128, 256)

    def __init__(self, backbone: nn.Module, freeze_backbone: bool = False, freeze_bn: bool = True,
                 frozen_early: bool = False):
        super().__init__()
        channels = list(backbone.tap_channels)
        if len(channels) < 3:
            raise ValueError(f"AffinityNet needs a backbone with at least three feature taps, got {len(channels)}")
        self.backbone = backbone
        self.freeze_backbone = freeze_backbone
        self.freeze_bn = freeze_bn or freeze_backbone
        self.reduce = nn.ModuleList(nn.Conv2d(c, w, 1, bias=False) for c, w in zip(channels[-3:], self.head_widths))
        width = sum(self.head_widths)
        self.fuse = nn.Conv2d(width, width, 1, bias=False)
        self.feature_channels = width
        for conv in self.reduce:
            nn.init.kaiming_normal_(conv.weight)
        nn.init.xavier_uniform_(self.fuse.weight, gain=4)
        for name, p in backbone.named_parameters():
            if freeze_backbone or (self.freeze_bn and _is_norm_param(backbone, name)):
                p.requires_grad_(False)
        for block in early_blocks(backbone) if frozen_early else []:
            block.requires_grad_(False)
        self.label_stride = _probe_stride(backbone, -3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map f (B, 448, h, w) at the stride of the third-last tap."""
        if self.freeze_backbone:
            with torch.no_grad():
                taps = self.backbone.taps(x)[-3:]
        else:
            taps = self.backbone.taps(x)[-3:]
        size = taps[0].shape[-2:]
        levels = [F.elu(_upsample_to(conv(t), size)) for conv, t in zip(self.reduce, taps)]
        return F.elu(self.fuse(torch.cat(levels, 1)))

    def pair_affinity(self, x: torch.Tensor, radius: int) -> dict[str, torch.Tensor]:
        return {"affinity": feature_affinity(self(x), radius)}

    def train(self, mode: bool = True) -> AffinityNet:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        elif self.freeze_bn:
            batchnorm_eval(self.backbone)
        return self

    def param_groups(self) -> list[dict]:
        """PSA/SEAM: pretrained weights 1x, pretrained biases 2x, new weights 10x, new biases 20x."""
        old_w, old_b = _split_decay(list(self.backbone.named_parameters()))
        new_w, new_b = _split_decay([(n, p) for n, p in self.named_parameters() if not n.startswith("backbone.")])
        return [{"params": old_w, "lr_mult": 1.0}, {"params": old_b, "lr_mult": 2.0, "decay": False},
                {"params": new_w, "lr_mult": 10.0}, {"params": new_b, "lr_mult": 20.0, "decay": False}]


def early_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The stem and the first residual stage, which PSA's, SEAM's and A2GNN's affinity nets never train:
    ResNet-38's conv1a, b2, b2_1 and b2_2; a ResNet's conv1, bn1 and layer1."""
    names = ("conv1a", "b2", "b2_1", "b2_2") if hasattr(backbone, "conv1a") else ("conv1", "bn1", "layer1")
    return [getattr(backbone, name) for name in names]


def _is_norm_param(root: nn.Module, name: str) -> bool:
    owner = root.get_submodule(name.rpartition(".")[0]) if "." in name else root
    return isinstance(owner, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm))


@torch.no_grad()
def _probe_stride(backbone: nn.Module, tap: int, size: int = 64) -> int:
    """Stride of one tap, measured on a small dummy input (backbones do not all declare it)."""
    was_training = backbone.training
    backbone.eval()
    try:
        param = next(backbone.parameters())
        out = backbone.taps(torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype))[tap]
    finally:
        backbone.train(was_training)
    return round(size / out.shape[-2])


# ------------------------------------------------------------------------------------------------ IRNet


class IRNet(nn.Module):
    """IRN's IRNet: a frozen backbone, a class-boundary branch at stride 4 and an optional displacement branch.

    The backbone is always in eval mode and its taps are detached: only the branches train.
    """

    def __init__(self, backbone: nn.Module, displacement: bool = False):
        super().__init__()
        channels = list(getattr(backbone, "tap_channels", []))
        if len(channels) != 5:
            raise ValueError(f"IRNet needs a ResNet backbone with five taps (stem, layer1..layer4); "
                             f"{type(backbone).__name__} has {len(channels)}")
        self.backbone = backbone
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.edge = nn.ModuleList(nn.Sequential(nn.Conv2d(c, 32, 1, bias=False), nn.GroupNorm(4, 32))
                                  for c in channels)
        self.edge_out = nn.Conv2d(32 * len(channels), 1, 1, bias=True)
        self.label_stride = 4
        self.displacement = _DisplacementBranch(channels) if displacement else None
        self.backbone.eval()

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            return [t.detach() for t in self.backbone.taps(x)]

    def boundary_logits(self, taps: list[torch.Tensor]) -> torch.Tensor:
        size = taps[0].shape[-2:]
        parts = [F.relu(_upsample_to(branch(t), size)) for branch, t in zip(self.edge, taps)]
        return self.edge_out(torch.cat(parts, 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"boundary": logits (B, 1, h4, w4)} plus {"displacement": (B, 2, h4, w4)} when that branch exists."""
        taps = self.taps(x)
        out = {"boundary": self.boundary_logits(taps)}
        if self.displacement is not None:
            out["displacement"] = self.displacement(taps)
        return out

    def pair_affinity(self, x: torch.Tensor, radius: int) -> dict[str, torch.Tensor]:
        out = self(x)
        result = {"affinity": boundary_affinity(torch.sigmoid(out["boundary"][:, 0]), radius)}
        if "displacement" in out:
            result["displacement"] = out["displacement"]
        return result

    def train(self, mode: bool = True) -> IRNet:
        super().train(mode)
        self.backbone.eval()
        return self

    def param_groups(self) -> list[dict]:
        """IRN: the boundary branch at the base LR, the displacement branch at 10x, everything decayed."""
        groups = [{"params": [*self.edge.parameters(), *self.edge_out.parameters()], "lr_mult": 1.0}]
        if self.displacement is not None:
            groups.append({"params": list(self.displacement.parameters()), "lr_mult": 10.0})
        return groups


def _conv_gn(cin: int, cout: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.GroupNorm(groups, cout), nn.ReLU(inplace=True))


class _DisplacementBranch(nn.Module):
    """IRN's displacement field head (instances only): coarse taps fused at stride 8, then at stride 4."""

    def __init__(self, channels: list[int]):
        super().__init__()
        self.levels = nn.ModuleList([_conv_gn(channels[0], 64, 8), _conv_gn(channels[1], 128, 16),
                                     _conv_gn(channels[2], 256, 16), _conv_gn(channels[3], 256, 16),
                                     _conv_gn(channels[4], 256, 16)])
        self.coarse = _conv_gn(768, 256, 16)
        self.fine = _conv_gn(448, 256, 16)
        self.out = nn.Conv2d(256, 2, 1, bias=False)

    def forward(self, taps: list[torch.Tensor]) -> torch.Tensor:
        x1, x2, x3, x4, x5 = (level(t) for level, t in zip(self.levels, taps))
        mid = x3.shape[-2:]
        coarse = self.coarse(torch.cat([x3, _upsample_to(x4, mid), _upsample_to(x5, mid)], 1))
        fine = torch.cat([x1, x2, _upsample_to(coarse, x1.shape[-2:])], 1)
        return self.out(self.fine(fine))

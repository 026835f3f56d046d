"""Multi-scale CAM inference (IRN's ``make_cam``, SEAM's ``infer_SEAM.py``).

Per image and scale: bicubic rescale, forward the image and its mirror, add the mirrored-back map; scales are
summed. Only the image's GT classes are kept. The model's ``cam_upsampling`` picks how one scale's stride-8 maps
reach the output grids, in its reference's order (the two orders give different maps: a two-step resize and
IRN's pad-and-crop place the grid differently):
``irn`` mirrors back at the grid, then resizes bilinearly (align_corners=False) to the stride-4 grid
ceil(H/4) x ceil(W/4) and, for the full-resolution map, to os*ceil(H/os) x os*ceil(W/os) cropped to H x W;
``seam`` resizes to the scaled image's size (align_corners=True, SEAM's network output), then to H x W
(align_corners=False), and mirrors back after resizing. SEAM has no stride-4 map; ours is the scaled-size map
resized to the stride-4 grid the same way. The model's ``cam_normalization`` picks the normalisation:
``max`` (IRN) divides each class by its own max (+1e-5); ``minmax`` (SEAM, whose ``cam`` is the raw PCM output)
applies ReLU to the sum, then maps each class's [min, max] to [0, 1], values within 1e-5 of the min becoming 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from data.dense import DenseMapWriter
from data.manifest import Manifest
from data.transforms import normalize, rescale
from models.cam import max_norm


@torch.no_grad()
def multiscale_cam(model: torch.nn.Module, rgb: np.ndarray, keys: Sequence[int], scales: Sequence[float],
                   flip: bool, output_stride: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Return (stride-4 CAM, full-resolution CAM) for the classes ``keys`` (1-based label indices)."""
    h, w = rgb.shape[:2]
    low_size = (math.ceil(h / 4), math.ceil(w / 4))
    index = torch.as_tensor([k - 1 for k in keys], dtype=torch.long, device=device)
    to_grids = UPSAMPLINGS[getattr(model, "cam_upsampling", "irn")]
    low = high = None
    for scale in scales:
        x = torch.from_numpy(normalize(rescale(rgb, scale)))[None].to(device)
        if flip:
            x = torch.cat([x, x.flip(-1)])
        lo, hi = to_grids(model.cam(x)[:, index], x.shape[-2:], low_size, (h, w), output_stride)
        low = lo if low is None else low + lo
        high = hi if high is None else high + hi
    normalise = NORMALISATIONS[getattr(model, "cam_normalization", "max")]
    return normalise(low).cpu().numpy(), normalise(high).cpu().numpy()


def irn_upsampling(cam: torch.Tensor, input_size: Sequence[int], low_size: Sequence[int], size: Sequence[int],
                   output_stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """IRN: mirror back at the grid (batch of 1 or image + mirror), then one resize per output grid."""
    cam = cam[:1] + cam[1:].flip(-1) if cam.shape[0] == 2 else cam
    h, w = size
    up_size = (output_stride * math.ceil(h / output_stride), output_stride * math.ceil(w / output_stride))
    lo = F.interpolate(cam, low_size, mode="bilinear", align_corners=False)[0]
    hi = F.interpolate(cam, up_size, mode="bilinear", align_corners=False)[0, :, :h, :w]
    return lo, hi


def seam_upsampling(cam: torch.Tensor, input_size: Sequence[int], low_size: Sequence[int], size: Sequence[int],
                    output_stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SEAM: to the scaled image's size (align_corners=True), to each output grid (False), then mirror back."""
    at_input = F.interpolate(cam, tuple(input_size), mode="bilinear", align_corners=True)
    lo = F.interpolate(at_input, tuple(low_size), mode="bilinear", align_corners=False)
    hi = F.interpolate(at_input, tuple(size), mode="bilinear", align_corners=False)
    if cam.shape[0] == 2:
        return lo[0] + lo[1].flip(-1), hi[0] + hi[1].flip(-1)
    return lo[0], hi[0]


UPSAMPLINGS = {"irn": irn_upsampling, "seam": seam_upsampling}


def max_normalise(cam: torch.Tensor) -> torch.Tensor:
    return cam / (cam.amax(dim=(1, 2), keepdim=True) + 1e-5)


def min_max_normalise(cam: torch.Tensor) -> torch.Tensor:
    return max_norm(cam[None])[0]  # SEAM's own normalisation, shared with its training losses


NORMALISATIONS = {"max": max_normalise, "minmax": min_max_normalise}


def make_cams(model: torch.nn.Module, manifest: Manifest, ids: Sequence[str], writer: DenseMapWriter,
              scales: Sequence[float], flip: bool, device: torch.device,
              progress: Callable[[float, str], None] | None = None) -> int:
    """Write CAMs of ``ids`` through ``writer``: datasets ``cam`` and ``high_res``, attribute ``keys``."""
    layout = manifest.layout
    output_stride = model.backbone.output_stride
    for n, image_id in enumerate(ids, start=1):
        rgb = layout.read_image(image_id)
        keys = manifest.image_labels[image_id]
        low, high = multiscale_cam(model, rgb, keys, scales, flip, output_stride, device)
        writer.write(image_id, {"cam": low, "high_res": high},
                     {"keys": np.asarray(keys, np.int32), "size": np.asarray(rgb.shape[:2], np.int32)})
        if progress and (n % 20 == 0 or n == len(ids)):
            progress(100.0 * n / len(ids), f"{n}/{len(ids)} images")
    return len(ids)

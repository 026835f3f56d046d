"""Image transforms for classification training and CAM inference (IRN's order of operations)."""

from __future__ import annotations

import cv2
import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def normalize(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> ImageNet-normalised float32 (3, H, W)."""
    x = (rgb.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def rescale(rgb: np.ndarray, scale: float) -> np.ndarray:
    """Bicubic rescale (IRN uses bicubic for images)."""
    if scale == 1.0:
        return rgb
    h, w = rgb.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_CUBIC)


def random_resize_long(rgb: np.ndarray, low: int, high: int, rng: np.random.Generator) -> np.ndarray:
    """Resize so the long side is an integer drawn uniformly from [low, high]."""
    target = int(rng.integers(low, high + 1))
    return rescale(rgb, target / max(rgb.shape[:2]))


def random_crop(x: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Random ``size`` x ``size`` crop of a (C, H, W) array; smaller images land at a random offset
    in a zero canvas (zero is the mean after normalisation)."""
    c, h, w = x.shape
    out = np.zeros((c, size, size), x.dtype)
    ch, cw = min(size, h), min(size, w)
    # Offsets into the source (when larger) and into the canvas (when smaller).
    sy = int(rng.integers(0, h - ch + 1))
    sx = int(rng.integers(0, w - cw + 1))
    dy = int(rng.integers(0, size - ch + 1))
    dx = int(rng.integers(0, size - cw + 1))
    out[:, dy:dy + ch, dx:dx + cw] = x[:, sy:sy + ch, sx:sx + cw]
    return out


def _grey(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of float RGB (H, W, 3), as (H, W, 1)."""
    return (rgb @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]


def color_jitter(rgb: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """torchvision-style ColorJitter(strength, strength, strength, strength / 3) on uint8 RGB.

    Brightness, contrast and saturation factors are drawn from [max(0, 1 - s), 1 + s] and the hue shift
    from [-s/3, s/3] of a full turn; the four are applied in a random order, clipping to [0, 255] after each.
    """
    x = rgb.astype(np.float32)
    factors = {op: rng.uniform(max(0.0, 1 - strength), 1 + strength) for op in ("brightness", "contrast", "saturation")}
    hue_shift = rng.uniform(-strength / 3, strength / 3)
    for op in rng.permutation(["brightness", "contrast", "saturation", "hue"]):
        if op == "brightness":
            x = x * factors[op]
        elif op == "contrast":
            x = (x - _grey(x).mean()) * factors[op] + _grey(x).mean()
        elif op == "saturation":
            grey = _grey(x)
            x = (x - grey) * factors[op] + grey
        else:
            # OpenCV's float HSV has hue in degrees [0, 360).
            hsv = cv2.cvtColor(x / 255.0, cv2.COLOR_RGB2HSV)
            hsv[..., 0] = (hsv[..., 0] + 360.0 * hue_shift) % 360.0
            x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * 255.0
        x = np.clip(x, 0.0, 255.0)
    return np.rint(x).astype(np.uint8)


def train_transform(rgb: np.ndarray, resize_long: tuple[int, int], crop_size: int,
                    rng: np.random.Generator, jitter: float = 0.0) -> np.ndarray:
    """IRN's classification augmentation: resize-long, (PSA/SEAM colour jitter), normalise, flip, crop.

    ``jitter`` = 0 draws nothing from ``rng``, so the other draws are unchanged.
    """
    rgb = random_resize_long(rgb, resize_long[0], resize_long[1], rng)
    if jitter > 0:
        rgb = color_jitter(rgb, jitter, rng)
    x = normalize(rgb)
    if rng.random() < 0.5:
        x = np.ascontiguousarray(x[:, :, ::-1])
    return random_crop(x, crop_size, rng)

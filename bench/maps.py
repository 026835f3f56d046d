"""Synthetic dense maps shared by the benchmarks."""

from __future__ import annotations

import numpy as np


def smooth_cam_stack(rng: np.random.Generator, k: int, h: int, w: int, max_sigma: float = 0.3) -> np.ndarray:
    """CAM-like maps: a few smooth bumps, max-normalised, small values near zero (like ReLU'd CAMs)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.zeros((k, h, w), np.float32)
    for c in range(k):
        for _ in range(rng.integers(1, 4)):
            cy, cx, s = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.08, max_sigma) * min(h, w)
            out[c] += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        out[c] = np.clip(out[c] / out[c].max() - 0.05, 0, None) / 0.95
    return out


def render_with_cams(seed: int, index: int, height: int, width: int, rng: np.random.Generator):
    """Synthetic render ``index`` of a one-image profile and CAM stand-ins for its classes: each class's GT mask
    blurred (sigma 3% of the short side), plus N(0, 0.05) noise drawn from ``rng``, clipped at 0 and
    max-normalised. Returns (sample, class ids (K,) ascending, CAMs (K, H, W) float32)."""
    import cv2

    from data.synthetic import Profile, render_sample

    sample = render_sample(seed, "train", index, Profile(n_train=index + 1, n_val=0, height=height, width=width))
    semantic = sample.semantic.astype(np.int32)
    keys = np.array(sorted({o.cls + 1 for o in sample.objects}))
    sigma = 0.03 * min(height, width)
    cams = []
    for c in keys:
        blurred = cv2.GaussianBlur((semantic == c).astype(np.float32), (0, 0), sigma)
        cams.append(np.clip(blurred + rng.normal(0, 0.05, blurred.shape), 0, None))
    high = np.stack(cams).astype(np.float32)
    high /= high.max(axis=(1, 2), keepdims=True)
    return sample, keys, high

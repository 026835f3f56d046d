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

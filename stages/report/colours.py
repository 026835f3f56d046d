"""Colours for the report's figures that stay apart for readers with a colour-vision deficiency.

Why not the label space's palette: the PNG labels keep it (VOC's bit-interleaved palette, which every VOC tool
reads), but in it dark reds (the demo's disc, boat, diamond) and greens (ring, heart) differ by one bit of one
channel; under deuteranopia two of them fall to ΔE 1, the same colour. The figures instead colour label ``i``
with ``figure_palette(n)[i]``: background black, ignore (255) white, and each class the colour, on a 16-level
sRGB grid, farthest (in CIELAB, ΔE76) from those already chosen as seen with normal vision and simulated with
each of protanopia, deuteranopia and tritanopia (Machado, Oliveira and Fernandes 2009, severity 1). Greedy
farthest-point selection is deterministic: the same label space always gets the same colours.

Cost: 4,096 candidates × 4 visions, one distance update per colour chosen: milliseconds for VOC's 21 classes.
"""

from __future__ import annotations

from functools import cache

import numpy as np

BACKGROUND_RGB = (0, 0, 0)
IGNORE_RGB = (255, 255, 255)

# Linear-RGB simulation matrices (Machado et al. 2009, severity 1.0); the identity is normal vision.
VISIONS = {
    "normal": np.eye(3),
    "protanopia": np.array([[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216],
                            [-0.003882, -0.048116, 1.051998]]),
    "deuteranopia": np.array([[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413],
                              [-0.011820, 0.042940, 0.968881]]),
    "tritanopia": np.array([[1.255528, -0.076749, -0.178779], [-0.078411, 0.930809, 0.147602],
                            [0.004733, 0.691367, 0.303900]]),
}
_SRGB_TO_XYZ = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
_D65_WHITE = np.array([0.95047, 1.0, 1.08883])

# Series colours of the charts (stages in the per-class bars): Okabe and Ito's set, built for the same readers.
SERIES_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")


def _linear(rgb: np.ndarray) -> np.ndarray:
    c = np.asarray(rgb, np.float64) / 255.0
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _lab(linear: np.ndarray) -> np.ndarray:
    xyz = (linear @ _SRGB_TO_XYZ.T) / _D65_WHITE
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def seen_as_lab(rgb: np.ndarray) -> np.ndarray:
    """(V, N, 3) CIELAB of N sRGB colours (N, 3) under each of the V visions."""
    linear = _linear(np.asarray(rgb).reshape(-1, 3))
    return np.stack([_lab(np.clip(linear @ matrix.T, 0.0, 1.0)) for matrix in VISIONS.values()])


def min_distance(rgb: np.ndarray) -> float:
    """The smallest ΔE76 between two of the colours under any of the visions: how confusable the closest pair is."""
    lab = seen_as_lab(rgb)
    distances = np.linalg.norm(lab[:, :, None] - lab[:, None], axis=-1)
    n = distances.shape[1]
    distances[:, np.arange(n), np.arange(n)] = np.inf
    return float(distances.min())


@cache
def _chosen(n_classes: int) -> tuple[tuple[int, int, int], ...]:
    levels = np.arange(0, 256, 17)
    candidates = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    seen = seen_as_lab(candidates)
    chosen = [BACKGROUND_RGB, IGNORE_RGB]
    nearest = np.full(len(candidates), np.inf)
    for colour in chosen:
        nearest = np.minimum(nearest, np.linalg.norm(seen - seen_as_lab(np.array([colour])), axis=-1).min(0))
    while len(chosen) < n_classes + 1:  # background and ignore, then the n - 1 classes
        best = int(np.argmax(nearest))
        chosen.append(tuple(int(v) for v in candidates[best]))
        nearest = np.minimum(nearest, np.linalg.norm(seen - seen[:, best:best + 1], axis=-1).min(0))
    return tuple(chosen)


def figure_palette(n_labels: int) -> np.ndarray:
    """A (256, 3) uint8 palette for figures of ``n_labels`` labels (background first): see the module docstring.
    Values past ``n_labels`` (never drawn) are grey."""
    if not 1 <= n_labels <= 255:
        raise ValueError(f"figure_palette: n_labels must be in 1..255, got {n_labels}")
    chosen = _chosen(n_labels)
    palette = np.full((256, 3), 128, np.uint8)
    palette[0] = chosen[0]
    palette[255] = chosen[1]
    palette[1:n_labels] = np.array(chosen[2:], np.uint8).reshape(-1, 3)
    return palette

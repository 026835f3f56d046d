"""Pixel-pair geometry shared by affinity training and the random walk.

Both AffinityNet and IRNet relate each pixel to the neighbours in a half disc of radius ``r`` (the other
half is the same pairs seen from the other end): offsets (0, 1..r-1) and, for dy = 1..r-1, every dx in
-(r-1)..r-1 with dx^2 + dy^2 < r^2. That is 34 offsets for r = 5 and 152 for r = 10.

IRNet scores a pair by the strongest boundary on the line between the two pixels: the lattice points of
the pair's bounding box whose perpendicular distance to the segment's line is below 1, both ends included.
"""

from __future__ import annotations

import math
from functools import cache


@cache
def half_disc_offsets(radius: int) -> tuple[tuple[int, int], ...]:
    """(dy, dx) offsets from a source pixel to its partners, in the references' order."""
    if radius < 2:
        raise ValueError(f"pair radius must be at least 2, got {radius}")
    offsets = [(0, dx) for dx in range(1, radius)]
    for dy in range(1, radius):
        for dx in range(-radius + 1, radius):
            if dx * dx + dy * dy < radius * radius:
                offsets.append((dy, dx))
    return tuple(offsets)


@cache
def line_path(dy: int, dx: int) -> tuple[tuple[int, int], ...]:
    """Lattice points (y, x), relative to the source, that lie on the way to (dy, dx), ends included."""
    length = math.hypot(dy, dx)
    points = []
    for y in range(min(0, dy), max(0, dy) + 1):
        for x in range(min(0, dx), max(0, dx) + 1):
            # Distance from (y, x) to the line through the origin and (dy, dx): |cross| / length.
            if length == 0 or abs(y * dx - x * dy) / length < 1:
                points.append((y, x))
    return tuple(points)

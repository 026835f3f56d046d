"""Seeds from the four supervisions A2GNN trains with: image labels, points, scribbles and boxes.

A2GNN ships its point/scribble/box seeds only as precomputed PNGs (``SEAM_Point``, ``SEAM_Scribble`` +
``Scribble_SuperPixel``, ``SEAM_Box``); the merge rules were never published. The rules below are our design
from the paper's description. Every rule starts from the image-level CAM seeds of ``stages.seeds.rules`` (label ids,
255 = ignore) and returns label ids (uint8, the image's size, 255 = ignore).

image
    The CAM seeds unchanged.

point (``SEAM_Point``)
    Each click stamps its class, background clicks included, over its SLIC superpixel (``point_stamp =
    superpixel``) or over a disk of ``point_radius`` pixels (``disk``). Annotation beats CAM: a stamped pixel
    takes the click's class whatever its CAM seed was. Two clicks of different classes claiming a pixel make
    it ignore (the clicked pixels themselves keep their class unless two clicks of different classes hit
    the very same pixel). Everything unstamped keeps its CAM seed, including foreground of a class no click
    names: the image labels still vouch for it.

scribble (``SEAM_Scribble`` and ``Scribble_SuperPixel``)
    Two maps. *affinity*: the CAM seeds with every scribbled pixel overriding them. *grown*: the scribbles
    alone, grown over SLIC superpixels: a superpixel touched by exactly one class's strokes takes that class,
    one touched by two or more classes stays ignore (its stroke pixels keep their own labels), untouched
    ones stay ignore. ``scribble_label`` picks which map becomes the stage's ``labels/`` PNG (default
    ``grown``: the reference's GNN supervision); the other is written to ``scribble_<other>/<id>.png`` next
    to it (see :func:`data.artifacts.label_file`).

box (``SEAM_Box``)
    - Pixels outside every box are background (certain: VOC boxes are tight).
    - Overlapping boxes: each in-box pixel belongs to the smallest box containing it (equal areas: the later
      box in the file).
    - Inside box b of class c (its own pixels only): foreground c where the CAM votes c (CAM seed = c, or
      CAM_c >= ``box_cam_threshold``) *and* an in-box GrabCut says foreground; background where GrabCut says
      background *and* the CAM agrees (CAM seed = background, or every CAM plane below ``box_bg_cam``) when
      ``box_inside_background`` is on; ignore otherwise.
    - A ring along each box's edges, ``box_ring`` x its shorter side wide (at least one pixel when > 0),
      stays ignore: tight boxes put object boundaries there, so the graph decides.
    - A CAM foreground seed of class c that lies in some box but in no box of c becomes ignore (outside every
      box it already is background).
    - GrabCut: ``cv2.grabCut`` in rect mode on the box plus a context margin (half the box's longer side + 8 px,
      clipped to the image), ``box_grabcut_iterations`` rounds, OpenCV's RNG seeded per call (deterministic).
      A box leaving too little context around it (e.g. one covering the whole image) runs GrabCut in mask
      mode instead, initialised from the CAM (probable foreground where the CAM votes c, definite
      background on CAM background seeds, probable background elsewhere); when even that lacks samples of
      one side, GrabCut is skipped and the CAM vote alone decides the foreground (no in-box background).
    - ``box_cam_threshold = 0`` makes GrabCut alone decide the foreground.

SLIC (:func:`slic_superpixels`): our own vectorised numpy version (scikit-image is not a dependency): CIELAB
colour plus position on a regular grid of about ``n_segments`` cells, centres nudged to the lowest gradient of
their 3 x 3 neighbourhood, each pixel compared with the centres of its own and the eight neighbouring grid cells,
then connectivity enforced (every segment one 4-connected component; fragments smaller than a quarter of a
cell merged into the most similar larger neighbour). Deterministic; about 0.3 s on 500 x 375 with one thread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from data.artifacts import SCRIBBLE_AFFINITY, SCRIBBLE_GROWN
from data.io import BadInputError
from data.labelspace import IGNORE_INDEX
from data.voc import VOCLayout
from stages.config import SUPERVISIONS, ExtractSeedsConfig

# GrabCut fits 5-component GMMs per side (k-means): it needs a few samples of each.
MIN_GRABCUT_SAMPLES = 32
# Context around a box handed to GrabCut: half the box's longer side plus this many pixels.
GRABCUT_CONTEXT_PIXELS = 8
GRABCUT_SEED = 0
SLIC_SMOOTHING = 1.0  # Gaussian sigma (pixels) applied to the Lab image before clustering


@dataclass
class SupervisedSeeds:
    """The stage's label map plus extra label maps (name -> uint8 map) written as ``<name>/<id>.png``."""

    label: np.ndarray
    extra: dict[str, np.ndarray] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ checks

def _check_rgb(rgb: np.ndarray) -> tuple[int, int]:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got {getattr(rgb, 'dtype', type(rgb))} "
                         f"{getattr(rgb, 'shape', '')}")
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"image is empty: {rgb.shape}")
    return rgb.shape[0], rgb.shape[1]


def _check_label_map(name: str, label: np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"{name} must be a 2-D label map, got shape {label.shape}")
    if shape is not None and label.shape != tuple(shape):
        raise ValueError(f"{name} size {label.shape} differs from the image size {tuple(shape)}")
    if not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"{name} must hold integer label ids, got {label.dtype}")
    if label.size and (label.min() < 0 or label.max() > IGNORE_INDEX):
        raise ValueError(f"{name} values must be label ids 0..254 or 255 = ignore, got range "
                         f"[{label.min()}, {label.max()}]")
    return label.astype(np.uint8, copy=False)


def _check_superpixels(superpixels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    superpixels = np.asarray(superpixels)
    if superpixels.shape != tuple(shape):
        raise ValueError(f"superpixel map size {superpixels.shape} differs from the image size {tuple(shape)}")
    if not np.issubdtype(superpixels.dtype, np.integer) or (superpixels.size and superpixels.min() < 0):
        raise ValueError("superpixel map must hold non-negative integer segment ids")
    return superpixels.astype(np.int64, copy=False)


# ------------------------------------------------------------------------------------------------- SLIC

def slic_superpixels(rgb: np.ndarray, n_segments: int = 300, compactness: float = 10.0,
                     iterations: int = 10) -> np.ndarray:
    """SLIC superpixels of ``rgb``: int32 (H, W) segment ids 0..n-1, each segment 4-connected."""
    h, w = _check_rgb(rgb)
    if n_segments < 1:
        raise ValueError(f"n_segments must be at least 1, got {n_segments}")
    if not compactness > 0:
        raise ValueError(f"compactness must be positive, got {compactness}")
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    lab = cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)  # L in 0..100, a/b about +-128
    # Light smoothing (like scikit-image's sigma): pixel noise otherwise splits two nearby centres of a flat
    # region by colour, into interleaved fragments.
    lab = cv2.GaussianBlur(lab, (0, 0), SLIC_SMOOTHING)
    # Equal grid cells of cell_h x cell_w pixels (the last row/column of cells padded), so that comparing
    # every pixel with the centres of its own and the 8 neighbouring cells is plain broadcasting.
    cell_h = math.ceil(h / max(1, min(h, round(h / math.sqrt(h * w / n_segments)))))
    cell_w = math.ceil(w / max(1, min(w, round(w / math.sqrt(h * w / n_segments)))))
    grid_h, grid_w = math.ceil(h / cell_h), math.ceil(w / cell_w)
    step = math.sqrt(h * w / (grid_h * grid_w))
    spatial_weight = np.float32((compactness / step) ** 2)
    padded_h, padded_w = grid_h * cell_h, grid_w * cell_w

    def blocks(plane: np.ndarray) -> np.ndarray:
        plane = np.pad(plane, ((0, padded_h - h), (0, padded_w - w)), mode="edge")
        return plane.reshape(grid_h, cell_h, grid_w, cell_w)

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    pixel = [blocks(lab[..., ch]) for ch in range(3)] + [blocks(yy), blocks(xx)]
    centre_y = np.minimum((np.arange(grid_h) + 0.5) * cell_h, h - 0.5).astype(np.int64)
    centre_x = np.minimum((np.arange(grid_w) + 0.5) * cell_w, w - 0.5).astype(np.int64)
    cy, cx = _lowest_gradient(lab, np.repeat(centre_y, grid_w), np.tile(centre_x, grid_h))
    # Start each centre's colour at a 5 x 5 mean, not a single pixel: on noisy images single-pixel colours send
    # the first assignment by colour alone and the segments never become compact.
    start_colour = cv2.blur(lab, (5, 5))[cy, cx]
    centres = np.concatenate([start_colour, cy[:, None], cx[:, None]], 1).astype(np.float64)  # (cells, 5): Lab, y, x
    cell_id = np.arange(grid_h * grid_w).reshape(grid_h, grid_w)
    far = 1e6  # centre coordinates of the missing neighbours beyond the grid: never the closest
    for _ in range(iterations):
        grid = np.full((5, grid_h + 2, grid_w + 2), far, np.float32)
        grid[:, 1:-1, 1:-1] = centres.T.reshape(5, grid_h, grid_w)
        best = np.full((grid_h, cell_h, grid_w, cell_w), np.inf, np.float32)
        assignment = np.zeros(best.shape, np.int64)
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                near = grid[:, 1 + dr:1 + dr + grid_h, 1 + dc:1 + dc + grid_w][:, :, None, :, None]
                colour = sum((pixel[ch] - near[ch]) ** 2 for ch in range(3))
                space = (pixel[3] - near[3]) ** 2 + (pixel[4] - near[4]) ** 2
                dist = colour + spatial_weight * space
                closer = dist < best  # strict: ties keep the earlier candidate (deterministic)
                best[closer] = dist[closer]
                k = np.clip(cell_id + dr * grid_w + dc, 0, None)[:, None, :, None]  # clip: never chosen if off-grid
                assignment[closer] = np.broadcast_to(k, best.shape)[closer]
        assignment = assignment.reshape(padded_h, padded_w)[:h, :w]
        flat = assignment.reshape(-1)
        counts = np.bincount(flat, minlength=grid_h * grid_w).astype(np.float64)
        used = counts > 0
        values = (*(lab[..., ch] for ch in range(3)), yy, xx)
        for ch, value in enumerate(values):
            centres[used, ch] = np.bincount(flat, value.reshape(-1), grid_h * grid_w)[used] / counts[used]
    return _enforce_connectivity(assignment, lab, max(1, int(0.25 * step * step)))


def _lowest_gradient(lab: np.ndarray, cy: np.ndarray, cx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Move each centre to the lowest colour-gradient pixel of its 3 x 3 neighbourhood (SLIC's init)."""
    h, w = lab.shape[:2]
    padded = np.pad(lab, ((1, 1), (1, 1), (0, 0)), mode="edge")
    gradient = (((padded[2:, 1:-1] - padded[:-2, 1:-1]) ** 2).sum(-1)
                + ((padded[1:-1, 2:] - padded[1:-1, :-2]) ** 2).sum(-1))
    best_y, best_x = cy.copy(), cx.copy()
    best = gradient[cy, cx]
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            ny, nx = np.clip(cy + dy, 0, h - 1), np.clip(cx + dx, 0, w - 1)
            value = gradient[ny, nx]
            lower = value < best
            best = np.where(lower, value, best)
            best_y, best_x = np.where(lower, ny, best_y), np.where(lower, nx, best_x)
    return best_y, best_x


def _neighbour_pairs(label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of 4-neighbour pixel pairs (right and down)."""
    index = np.arange(label.size).reshape(label.shape)
    first = np.concatenate([index[:, :-1].ravel(), index[:-1, :].ravel()])
    second = np.concatenate([index[:, 1:].ravel(), index[1:, :].ravel()])
    return first, second


def _enforce_connectivity(assignment: np.ndarray, lab: np.ndarray, min_size: int) -> np.ndarray:
    """Split segments into 4-connected components, merge small ones into a similar larger neighbour, relabel."""
    n = assignment.size
    first, second = _neighbour_pairs(assignment)
    flat = assignment.reshape(-1)
    same = flat[first] == flat[second]
    graph = coo_matrix((np.ones(int(same.sum()), np.int8), (first[same], second[same])), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    flat_lab = lab.reshape(-1, 3).astype(np.float64)
    for _ in range(8):  # each round merges every small fragment that has a larger neighbour
        count = component.max() + 1
        size = np.bincount(component, minlength=count)
        small = size < min_size
        if not small[component].any():
            break
        mean = np.stack([np.bincount(component, flat_lab[:, ch], count) for ch in range(3)], 1)
        mean /= np.maximum(size, 1)[:, None]
        a, b = component[first], component[second]
        touch = a != b
        a, b = np.concatenate([a[touch], b[touch]]), np.concatenate([b[touch], a[touch]])
        # merge only into a neighbour larger in (size, id) order: no cycles, unions stay connected
        larger = (size[b] > size[a]) | ((size[b] == size[a]) & (b > a))
        keep = small[a] & larger
        a, b = a[keep], b[keep]
        if a.size == 0:
            break
        distance = ((mean[a] - mean[b]) ** 2).sum(1)
        order = np.lexsort((b, distance, a))  # per fragment: most similar neighbour first, ties by id
        a, b = a[order], b[order]
        firsts = np.concatenate([[True], a[1:] != a[:-1]])
        target = np.arange(count)
        target[a[firsts]] = b[firsts]
        for _ in range(count):  # follow chains (fragment -> fragment -> ...) to their end
            nxt = target[target]
            if np.array_equal(nxt, target):
                break
            target = nxt
        component = target[component]
    _, relabelled = np.unique(component, return_inverse=True)
    return relabelled.reshape(assignment.shape).astype(np.int32)


# ------------------------------------------------------------------------------------------------ points

def point_seeds(cam_seeds: np.ndarray, points: Sequence[Sequence[int]] | np.ndarray, stamp: str = "superpixel",
                radius: int = 3, superpixels: np.ndarray | None = None) -> np.ndarray:
    """CAM seeds with each click's class stamped over its superpixel or disk (see the module docstring).

    ``points``: (label id, x, y) rows, 0-based pixel coordinates.
    """
    cam_seeds = _check_label_map("CAM seed map", cam_seeds)
    shape = cam_seeds.shape
    points = np.asarray(points, np.int64).reshape(-1, 3) if len(points) else np.zeros((0, 3), np.int64)
    labels, xs, ys = points[:, 0], points[:, 1], points[:, 2]
    if np.any((labels < 0) | (labels >= IGNORE_INDEX)):
        raise ValueError(f"point classes must be label ids 0..254, got {sorted(set(labels.tolist()))}")
    outside = (xs < 0) | (xs >= shape[1]) | (ys < 0) | (ys >= shape[0])
    if outside.any():
        j = int(np.argmax(outside))
        raise ValueError(f"point ({xs[j]}, {ys[j]}) lies outside the {shape[1]}x{shape[0]} image")
    if stamp == "superpixel":
        if superpixels is None:
            raise ValueError("point_stamp 'superpixel' needs a superpixel map")
        superpixels = _check_superpixels(superpixels, shape)
        regions = [superpixels == superpixels[y, x] for x, y in zip(xs, ys)]
    elif stamp == "disk":
        if radius < 0:
            raise ValueError(f"point radius must be >= 0, got {radius}")
        yy, xx = np.ogrid[:shape[0], :shape[1]]
        regions = [(yy - y) ** 2 + (xx - x) ** 2 <= radius * radius for x, y in zip(xs, ys)]
    else:
        raise ValueError(f"point stamp must be 'superpixel' or 'disk', got {stamp!r}")

    stamped = np.full(shape, IGNORE_INDEX, np.uint8)
    conflict = np.zeros(shape, bool)
    for label, region in zip(labels, regions):
        conflict |= region & (stamped != IGNORE_INDEX) & (stamped != label)
        stamped[region] = label
    stamped[conflict] = IGNORE_INDEX
    # The clicked pixels themselves are certain, unless two clicks of different classes share one.
    click = np.full(shape, IGNORE_INDEX, np.int64)
    clash = np.zeros(shape, bool)
    for label, x, y in zip(labels, xs, ys):
        clash[y, x] |= click[y, x] not in (IGNORE_INDEX, label)
        click[y, x] = label
    clicked = (click != IGNORE_INDEX) & ~clash
    stamped[clicked] = click[clicked]
    conflict &= ~clicked

    out = cam_seeds.copy()
    annotated = stamped != IGNORE_INDEX
    out[annotated] = stamped[annotated]
    out[conflict] = IGNORE_INDEX
    return out


# --------------------------------------------------------------------------------------------- scribbles

def grow_scribbles(scribble: np.ndarray, superpixels: np.ndarray) -> np.ndarray:
    """Scribbles grown over superpixels: one class touching a superpixel labels all of it; two or more
    leave it ignore (its stroke pixels keep their labels)."""
    scribble = _check_label_map("scribble map", scribble)
    superpixels = _check_superpixels(superpixels, scribble.shape)
    labelled = scribble != IGNORE_INDEX
    n_segments = int(superpixels.max()) + 1 if superpixels.size else 0
    pairs = np.unique(superpixels[labelled] * 256 + scribble[labelled])
    segment, label = pairs // 256, pairs % 256
    classes_touching = np.bincount(segment, minlength=n_segments)
    segment_label = np.full(n_segments, IGNORE_INDEX, np.uint8)
    single = classes_touching[segment] == 1
    segment_label[segment[single]] = label[single]
    grown = segment_label[superpixels]
    grown[labelled] = scribble[labelled]
    return grown


def scribble_seeds(cam_seeds: np.ndarray, scribble: np.ndarray,
                   superpixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(affinity seeds = CAM seeds with scribbled pixels overriding, scribbles grown over superpixels)."""
    cam_seeds = _check_label_map("CAM seed map", cam_seeds)
    scribble = _check_label_map("scribble map", scribble, cam_seeds.shape)
    affinity = cam_seeds.copy()
    labelled = scribble != IGNORE_INDEX
    affinity[labelled] = scribble[labelled]
    return affinity, grow_scribbles(scribble, superpixels)


# ------------------------------------------------------------------------------------------------- boxes

def _check_boxes(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    boxes = np.asarray(boxes)
    if boxes.size == 0:
        return np.zeros((0, 5), np.int64)
    if boxes.ndim != 2 or boxes.shape[1] != 5 or not np.issubdtype(boxes.dtype, np.integer):
        raise ValueError(f"boxes must be an integer (M, 5) array of (label, x0, y0, x1, y1), got "
                         f"{boxes.dtype} {boxes.shape}")
    boxes = boxes.astype(np.int64)
    label, x0, y0, x1, y1 = boxes.T
    if np.any((label < 1) | (label >= IGNORE_INDEX)):
        raise ValueError(f"box classes must be foreground label ids 1..254, got {sorted(set(label.tolist()))}")
    bad = (x0 < 0) | (y0 < 0) | (x1 >= shape[1]) | (y1 >= shape[0]) | (x1 < x0) | (y1 < y0)
    if bad.any():
        raise ValueError(f"box {boxes[int(np.argmax(bad))].tolist()} is not a 0-based inclusive box inside the "
                         f"{shape[1]}x{shape[0]} image")
    return boxes


def grabcut_foreground(rgb: np.ndarray, box: Sequence[int], iterations: int = 3,
                       prior_fg: np.ndarray | None = None, prior_bg: np.ndarray | None = None) -> np.ndarray | None:
    """GrabCut's foreground inside ``box`` = (x0, y0, x1, y1) (inclusive), as a bool map of the box window.

    Rect mode on the box plus context; where the context is too small, mask mode from ``prior_fg`` (probable
    foreground) and ``prior_bg`` (definite background), both full-image bool maps. None when GrabCut cannot
    run (too few samples of either side).
    """
    h, w = _check_rgb(rgb)
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 <= x1 < w and 0 <= y0 <= y1 < h):
        raise ValueError(f"GrabCut box {(x0, y0, x1, y1)} is not inside the {w}x{h} image")
    if iterations < 1:
        raise ValueError(f"GrabCut needs at least one iteration, got {iterations}")
    bw, bh = x1 - x0 + 1, y1 - y0 + 1
    margin = max(bw, bh) // 2 + GRABCUT_CONTEXT_PIXELS
    cx0, cy0, cx1, cy1 = max(0, x0 - margin), max(0, y0 - margin), min(w - 1, x1 + margin), min(h - 1, y1 + margin)
    crop = np.ascontiguousarray(rgb[cy0:cy1 + 1, cx0:cx1 + 1])
    context = crop.shape[0] * crop.shape[1] - bw * bh
    mask = np.zeros(crop.shape[:2], np.uint8)
    bgd_model, fgd_model = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    if bw * bh < MIN_GRABCUT_SAMPLES:
        return None
    window = (slice(y0 - cy0, y1 - cy0 + 1), slice(x0 - cx0, x1 - cx0 + 1))
    if context >= MIN_GRABCUT_SAMPLES:
        mode, rect = cv2.GC_INIT_WITH_RECT, (x0 - cx0, y0 - cy0, bw, bh)
    else:
        mode, rect = cv2.GC_INIT_WITH_MASK, None
        mask[:] = cv2.GC_BGD
        inside = mask[window]
        fg = np.zeros((bh, bw), bool) if prior_fg is None else np.asarray(prior_fg, bool)[y0:y1 + 1, x0:x1 + 1]
        bg = np.zeros((bh, bw), bool) if prior_bg is None else np.asarray(prior_bg, bool)[y0:y1 + 1, x0:x1 + 1]
        inside[:] = np.where(fg, cv2.GC_PR_FGD, np.where(bg, cv2.GC_BGD, cv2.GC_PR_BGD))
        fg_samples = int(fg.sum())
        if fg_samples < MIN_GRABCUT_SAMPLES or mask.size - fg_samples < MIN_GRABCUT_SAMPLES:
            return None
    cv2.setRNGSeed(GRABCUT_SEED)  # GrabCut's k-means init draws from OpenCV's global RNG
    cv2.grabCut(crop, mask, rect, bgd_model, fgd_model, iterations, mode)
    result = mask[window]
    return (result == cv2.GC_FGD) | (result == cv2.GC_PR_FGD)


def box_seeds(rgb: np.ndarray, cam_seeds: np.ndarray, cam_high: np.ndarray, keys: Sequence[int],
              boxes: np.ndarray, grabcut_iterations: int = 3, cam_threshold: float = 0.5, ring: float = 0.05,
              inside_background: bool = True, bg_cam: float = 0.1) -> np.ndarray:
    """Seeds from boxes, CAM seeds, CAMs and in-box GrabCut (rules in the module docstring).

    ``boxes``: int (M, 5) rows (label id, x0, y0, x1, y1), 0-based inclusive; ``cam_high`` (K, H, W) CAMs of
    the label ids ``keys``.
    """
    shape = _check_rgb(rgb)
    cam_seeds = _check_label_map("CAM seed map", cam_seeds, shape)
    cam = np.asarray(cam_high, np.float32)
    if cam.ndim != 3 or cam.shape[1:] != shape or cam.shape[0] != len(keys):
        raise ValueError(f"CAM must be (K={len(keys)}, {shape[0]}, {shape[1]}), got {cam.shape}")
    keys = [int(k) for k in keys]
    boxes = _check_boxes(boxes, shape)
    for name, value in (("box CAM threshold", cam_threshold), ("box background CAM level", bg_cam)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if not 0 <= ring < 0.5:
        raise ValueError(f"box ring must be a fraction in [0, 0.5), got {ring}")

    owner = np.full(shape, -1, np.int64)
    area = (boxes[:, 3] - boxes[:, 1] + 1) * (boxes[:, 4] - boxes[:, 2] + 1)
    for i in np.argsort(-area, kind="stable"):  # smaller boxes painted last win their pixels
        _, x0, y0, x1, y1 = boxes[i]
        owner[y0:y1 + 1, x0:x1 + 1] = i
    label = np.where(owner < 0, 0, IGNORE_INDEX).astype(np.uint8)
    max_cam = cam.max(0) if len(keys) else np.zeros(shape, np.float32)
    cam_background = (cam_seeds == 0) | (max_cam < bg_cam)

    for i, (c, x0, y0, x1, y1) in enumerate(boxes):
        window = (slice(y0, y1 + 1), slice(x0, x1 + 1))
        bh, bw = y1 - y0 + 1, x1 - x0 + 1
        own = owner[window] == i
        width = math.ceil(ring * min(bh, bw)) if ring > 0 else 0
        if width:
            yy, xx = np.ogrid[:bh, :bw]
            edge = np.minimum(np.minimum(yy, bh - 1 - yy), np.minimum(xx, bw - 1 - xx))
            own &= edge >= width
        cam_c = cam[keys.index(c)] if c in keys else np.zeros(shape, np.float32)
        vote = (cam_seeds == c) | (cam_c >= cam_threshold)
        grabcut = grabcut_foreground(rgb, (x0, y0, x1, y1), grabcut_iterations, vote, cam_seeds == 0)
        inside = label[window]
        if grabcut is None:  # too small or no samples: the CAM vote alone, no in-box background
            inside[own & vote[window]] = c
            continue
        inside[own & vote[window] & grabcut] = c
        if inside_background:
            inside[own & ~grabcut & cam_background[window]] = 0

    # CAM foreground of a class with no box over the pixel: outside every box it is background already.
    in_own_class_box = np.zeros(shape, bool)
    for c, x0, y0, x1, y1 in boxes:
        in_own_class_box[y0:y1 + 1, x0:x1 + 1] |= cam_seeds[y0:y1 + 1, x0:x1 + 1] == c
    stray = (cam_seeds != 0) & (cam_seeds != IGNORE_INDEX) & (owner >= 0) & ~in_own_class_box
    label[stray] = IGNORE_INDEX
    return label


def supervision_boxes(layout: VOCLayout, image_id: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """The image's boxes, int64 (M, 5) rows (label id, x0, y0, x1, y1), 0-based inclusive, clipped to the
    image (``size`` = (H, W) if known). Raises BadInputError naming the XML file."""
    return layout.read_boxes(image_id, size)


# --------------------------------------------------------------------------------------------- the stage

def validate_supervision_config(cfg: ExtractSeedsConfig) -> None:
    """Reject supervision knobs no rule can use, naming the key."""
    name = "ExtractSeeds"
    if cfg.supervision not in SUPERVISIONS:
        raise ValueError(f"{name}.supervision = {cfg.supervision!r}; choose one of {', '.join(SUPERVISIONS)}")
    if cfg.point_stamp not in ("superpixel", "disk"):
        raise ValueError(f"{name}.point_stamp = {cfg.point_stamp!r}; choose superpixel or disk")
    if cfg.scribble_label not in ("grown", "affinity"):
        raise ValueError(f"{name}.scribble_label = {cfg.scribble_label!r}; choose grown or affinity")
    if cfg.superpixels < 1 or cfg.superpixel_iterations < 1 or not cfg.superpixel_compactness > 0:
        raise ValueError(f"{name}: superpixels and superpixel_iterations must be >= 1 and superpixel_compactness "
                         f"> 0, got {cfg.superpixels}, {cfg.superpixel_iterations}, {cfg.superpixel_compactness}")
    if cfg.point_radius < 0:
        raise ValueError(f"{name}.point_radius must be >= 0, got {cfg.point_radius}")
    if cfg.box_grabcut_iterations < 1:
        raise ValueError(f"{name}.box_grabcut_iterations must be >= 1, got {cfg.box_grabcut_iterations}")
    for key in ("box_cam_threshold", "box_bg_cam"):
        if not 0 <= getattr(cfg, key) <= 1:
            raise ValueError(f"{name}.{key} must be in [0, 1], got {getattr(cfg, key)}")
    if not 0 <= cfg.box_ring < 0.5:
        raise ValueError(f"{name}.box_ring must be in [0, 0.5), got {cfg.box_ring}")


def _superpixels(rgb: np.ndarray, cfg: ExtractSeedsConfig) -> np.ndarray:
    return slic_superpixels(rgb, cfg.superpixels, cfg.superpixel_compactness, cfg.superpixel_iterations)


def merge_supervision(cfg: ExtractSeedsConfig, layout: VOCLayout, image_id: str, rgb: np.ndarray,
                      cam_high: np.ndarray, keys: Sequence[int], cam_seeds: np.ndarray) -> SupervisedSeeds:
    """The configured supervision merged into one image's CAM seeds; annotation files read from ``layout``."""
    shape = rgb.shape[:2]
    if cfg.supervision == "image":
        return SupervisedSeeds(cam_seeds)
    if cfg.supervision == "point":
        points = layout.read_points(image_id)
        for _label, x, y in points:
            if x >= shape[1] or y >= shape[0]:
                raise BadInputError(layout.points_path(image_id),
                                    f"point ({x}, {y}) lies outside the {shape[1]}x{shape[0]} image")
        superpixels = _superpixels(rgb, cfg) if cfg.point_stamp == "superpixel" else None
        return SupervisedSeeds(point_seeds(cam_seeds, points, cfg.point_stamp, cfg.point_radius, superpixels))
    if cfg.supervision == "scribble":
        scribble = layout.read_scribble(image_id)
        if scribble.shape != shape:
            raise BadInputError(layout.scribble_path(image_id),
                                f"scribble size {scribble.shape} differs from the image size {shape}")
        affinity, grown = scribble_seeds(cam_seeds, scribble, _superpixels(rgb, cfg))
        if cfg.scribble_label == "grown":
            return SupervisedSeeds(grown, {SCRIBBLE_AFFINITY: affinity})
        return SupervisedSeeds(affinity, {SCRIBBLE_GROWN: grown})
    if cfg.supervision == "box":
        boxes = supervision_boxes(layout, image_id, shape)
        return SupervisedSeeds(box_seeds(rgb, cam_seeds, cam_high, keys, boxes, cfg.box_grabcut_iterations,
                                         cfg.box_cam_threshold, cfg.box_ring, cfg.box_inside_background,
                                         cfg.box_bg_cam))
    raise ValueError(f"ExtractSeeds.supervision = {cfg.supervision!r}; choose one of {', '.join(SUPERVISIONS)}")

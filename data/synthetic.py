"""The embedded synthetic WSSS dataset, written to disk in PASCAL VOC layout.

Design goals (a fair weakly-supervised problem, not a toy):
- ten shape classes whose colours come from overlapping pools, so no class is separable by colour; each
  class wears its own primary texture most of the time and a secondary one shared with another class;
- five textured scene types with amoeba-shaped clutter in object-like colours and textures;
- one to four objects per image over a 4x range of sizes, drawn in order so later objects occlude earlier;
- co-occurrence bias: each class has a home scene (the "boat on water" effect), so a CAM leaks into
  context exactly as on VOC;
- VOC-style 255 bands along object borders, instance masks, XML boxes, plus points, scribbles and part
  masks (2-4 parts per class) for the later point/scribble/box/part stages.

Every image is drawn from its own generator seeded by (seed, split, index), so the dataset is the same
whatever the order or number of processes that generate it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from xml.etree import ElementTree

import cv2
import numpy as np

from data.io import atomic_path, write_jpeg, write_label_png
from data.labelspace import LabelSpace, voc_palette
from data.parts import PartSpace

GENERATOR_VERSION = 1


@dataclass(frozen=True)
class Profile:
    n_train: int
    n_val: int
    height: int
    width: int
    min_size: float = 0.12  # smallest object half-extent, as a fraction of the shorter image side
    border: int = 1         # width of the 255 band along object borders (VOC: about 5 px at 500 px)
    object_counts: tuple[float, ...] = (0.45, 0.3, 0.15, 0.1)  # P(1 object), P(2 objects), ...
    home_bias: float = 0.8          # P(the scene is the first object's home scene)
    home_cooccurrence: float = 0.6  # P(a further object is one that lives in that scene)
    clutter: tuple[int, int] = (1, 4)  # distractor blobs per image, drawn uniformly in [low, high]


PROFILES: dict[str, Profile] = {
    "tiny": Profile(n_train=24, n_val=12, height=64, width=80),
    "demo": Profile(n_train=640, n_val=160, height=112, width=144),
    # twice the demo's side on fewer images: what running a preset sized for the demo on other data looks like
    "double": Profile(n_train=400, n_val=150, height=224, width=288, border=2),
    "large": Profile(n_train=10000, n_val=1500, height=240, width=320, border=2),
}


def pretraining_profile(size: int) -> Profile:
    """Our stand-in for ImageNet: one object per square image, any scene, no co-occurrence.

    Images of this profile are rendered on the fly (``split="pretrain"``, a seed space of its own) and never
    written to disk; each is labelled with its single class, as an ImageNet image is.
    """
    return Profile(n_train=0, n_val=0, height=size, width=size, min_size=0.15, object_counts=(1.0,),
                   home_bias=0.0, home_cooccurrence=0.0, clutter=(0, 3))

# ---------------------------------------------------------------------------------------------- the classes

# name, parts, (primary texture, secondary texture), colour pool, home scene, rotation range (radians)
HUES = {
    "red": (200, 55, 45), "orange": (225, 135, 40), "yellow": (215, 195, 70), "green": (70, 150, 65),
    "teal": (45, 145, 140), "blue": (55, 85, 195), "purple": (125, 65, 165), "brown": (125, 88, 55),
    "grey": (140, 140, 140), "white": (225, 225, 215),
}
TEXTURES = ("stripes", "checker", "dots", "rings", "mottled", "solid", "zigzag", "grid", "hatch", "spots")
CLUTTER_TEXTURES = ("mottled", "solid")  # clutter looks like stuff, not like a class
SCENES = ("water", "grass", "sand", "sky", "indoor")


@dataclass(frozen=True)
class ShapeClass:
    name: str
    parts: tuple[str, ...]
    textures: tuple[str, ...]
    colours: tuple[str, ...]
    home: str
    max_rotation: float


CLASSES: tuple[ShapeClass, ...] = (
    ShapeClass("disc", ("core", "upper", "lower"), ("rings", "spots"), ("red", "yellow", "blue", "grey"),
               "sand", np.pi),
    ShapeClass("ring", ("upper", "lower"), ("solid", "hatch"), ("orange", "teal", "white", "red"),
               "water", np.pi),
    ShapeClass("square", ("q1", "q2", "q3", "q4"), ("checker", "grid"), ("brown", "blue", "yellow", "grey"),
               "indoor", np.pi / 4),
    ShapeClass("triangle", ("apex", "base"), ("zigzag", "stripes"), ("green", "orange", "purple", "brown"),
               "grass", np.pi / 6),
    ShapeClass("star", ("core", "arms"), ("spots", "solid"), ("yellow", "white", "red", "purple"),
               "sky", np.pi),
    ShapeClass("cross", ("centre", "horizontal", "vertical"), ("grid", "checker"), ("red", "white", "teal", "green"),
               "indoor", np.pi / 8),
    ShapeClass("crescent", ("upper_horn", "lower_horn", "belly"), ("mottled", "rings"),
               ("white", "yellow", "grey", "blue"), "sky", np.pi / 3),
    ShapeClass("boat", ("bow", "hull", "stern"), ("stripes", "zigzag"), ("brown", "white", "red", "orange"),
               "water", np.pi / 10),
    ShapeClass("diamond", ("upper", "lower"), ("hatch", "dots"), ("purple", "green", "teal", "orange"),
               "grass", np.pi / 8),
    ShapeClass("heart", ("left_lobe", "right_lobe", "tip"), ("dots", "mottled"), ("red", "purple", "brown", "teal"),
               "indoor", np.pi / 8),
)

SCENE_HUES = {
    "water": ("blue", "teal"), "grass": ("green", "brown"), "sand": ("yellow", "orange"),
    "sky": ("blue", "white"), "indoor": ("grey", "brown"),
}


def label_space() -> LabelSpace:
    return LabelSpace(("background", *(c.name for c in CLASSES)))


def part_label_space() -> LabelSpace:
    names = ["background"] + [f"{c.name}.{p}" for c in CLASSES for p in c.parts]
    return LabelSpace(tuple(names))


def part_space() -> PartSpace:
    """The part label space with each part's object (its name prefix), as written to ``parts.json``."""
    owner = [0] + [k for k, c in enumerate(CLASSES, start=1) for _ in c.parts]
    return PartSpace(part_label_space(), label_space(), tuple(owner))


def _part_offsets() -> list[int]:
    offsets, total = [], 1
    for cls in CLASSES:
        offsets.append(total)
        total += len(cls.parts)
    return offsets


PART_OFFSETS = _part_offsets()


def shape_and_parts(index: int, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inside-mask and part index of class ``index`` (0-based) at object-frame coordinates (u, v).

    The object spans roughly [-1, 1]^2; v grows downwards like image rows.
    """
    r = np.hypot(u, v)
    phi = np.arctan2(v, u)
    zeros = np.zeros(u.shape, dtype=np.int64)
    name = CLASSES[index].name
    if name == "disc":
        inside = r <= 1.0
        part = np.where(r < 0.45, 0, np.where(v < 0, 1, 2))
    elif name == "ring":
        inside = (r <= 1.0) & (r >= 0.55)
        part = np.where(v < 0, 0, 1)
    elif name == "square":
        inside = u ** 4 + v ** 4 <= 0.55
        part = (u >= 0).astype(np.int64) + 2 * (v >= 0)
    elif name == "triangle":
        inside = (v >= -0.95) & (v <= 0.8) & (np.abs(u) <= (v + 0.95) * 0.6)
        part = np.where(v < -0.2, 0, 1)
    elif name == "star":
        inside = r <= 0.4 + 0.6 * ((1 + np.cos(5 * phi)) / 2) ** 2
        part = np.where(r < 0.45, 0, 1)
    elif name == "cross":
        arm_h = (np.abs(v) <= 0.3) & (np.abs(u) <= 1.0)
        arm_v = (np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)
        inside = arm_h | arm_v
        part = np.where(arm_h & arm_v, 0, np.where(arm_h, 1, 2))
    elif name == "crescent":
        inside = (r <= 1.0) & (np.hypot(u - 0.5, v) > 0.78)
        part = np.where(v < -0.35, 0, np.where(v > 0.35, 1, 2))
    elif name == "boat":
        inside = (u ** 2 + (v / 0.38) ** 2 <= 1.0) & (v >= -0.2)
        part = np.where(u > 0.45, 0, np.where(u < -0.45, 2, 1))
    elif name == "diamond":
        inside = np.abs(u) / 0.7 + np.abs(v) <= 1.0
        part = np.where(v < 0, 0, 1)
    elif name == "heart":
        x, y = u * 1.15, -v * 1.15 + 0.25
        inside = (x ** 2 + y ** 2 - 1) ** 3 - x ** 2 * y ** 3 <= 0
        part = np.where(v >= 0.05, 2, np.where(u < 0, 0, 1))
    else:  # pragma: no cover - the class table and this function are edited together
        raise KeyError(name)
    return inside, np.where(inside, part, zeros)


# ---------------------------------------------------------------------------------------------- rendering

def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Value noise in [0, 1]: a coarse random grid upsampled bicubically."""
    gh, gw = max(2, h // cell + 2), max(2, w // cell + 2)
    grid = rng.random((gh, gw), dtype=np.float32)
    return np.clip(cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC), 0, 1)


def _jitter_colour(rng: np.random.Generator, hue: str, amount: float = 28) -> np.ndarray:
    return np.clip(np.asarray(HUES[hue], np.float32) + rng.normal(0, amount, 3), 0, 255)


def _pattern(rng: np.random.Generator, texture: str, u: np.ndarray, v: np.ndarray, size: float) -> np.ndarray:
    """Texture value in [0, 1] in object coordinates, so it turns with the object.

    The period is drawn in pixels (5-9 px), not relative to the object, so textures stay visible on small
    objects instead of blurring into their mean colour.
    """
    freq = size / rng.uniform(5.0, 9.0) / 1.5
    angle = rng.uniform(0, np.pi)
    if texture == "stripes":
        return 0.5 + 0.5 * np.sin(2 * np.pi * freq * (u * np.cos(angle) + v * np.sin(angle)))
    if texture == "checker":
        return (np.sin(np.pi * freq * u) * np.sin(np.pi * freq * v) > 0).astype(np.float32)
    if texture == "dots":
        fu, fv = (u * freq * 1.5) % 1 - 0.5, (v * freq * 1.5) % 1 - 0.5
        return (fu ** 2 + fv ** 2 < 0.07).astype(np.float32)
    if texture == "rings":
        return 0.5 + 0.5 * np.sin(2 * np.pi * freq * np.hypot(u, v))
    if texture == "grid":
        fu, fv = (u * freq * 1.5) % 1, (v * freq * 1.5) % 1
        return ((fu < 0.22) | (fv < 0.22)).astype(np.float32)
    if texture == "hatch":
        a = (u + v) * freq * 2.5 % 1 < 0.3
        b = (u - v) * freq * 2.5 % 1 < 0.3
        return (a | b).astype(np.float32)
    if texture == "spots":
        h, w = u.shape
        return (_smooth_noise(rng, h, w, cell=max(2, min(h, w) // 6)) > 0.6).astype(np.float32)
    if texture == "zigzag":
        t = u * np.cos(angle) + v * np.sin(angle)
        s = -u * np.sin(angle) + v * np.cos(angle)
        return ((t * freq * 2 + np.abs((s * freq * 2) % 2 - 1)) % 1 > 0.5).astype(np.float32)
    if texture == "mottled":
        h, w = u.shape
        return _smooth_noise(rng, h, w, cell=max(2, min(h, w) // 5))
    return np.full(u.shape, 0.5, np.float32)  # solid


def _scene(rng: np.random.Generator, scene: str, h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    c1 = _jitter_colour(rng, SCENE_HUES[scene][0], 22)
    c2 = _jitter_colour(rng, SCENE_HUES[scene][1], 22)
    scale = min(h, w)
    if scene == "water":
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (y / scale * rng.uniform(6, 10)
                                            + 0.6 * _smooth_noise(rng, h, w, scale // 4)))
    elif scene == "grass":
        t = _smooth_noise(rng, h, w, 3) * 0.6 + 0.4 * np.sin(x / scale * rng.uniform(40, 70)) ** 2
    elif scene == "sand":
        t = 0.7 * _smooth_noise(rng, h, w, scale // 3) + 0.3 * rng.random((h, w), dtype=np.float32)
    elif scene == "sky":
        t = np.clip(y / h * 0.6 + 0.8 * (_smooth_noise(rng, h, w, scale // 3) > 0.62), 0, 1)
    else:  # indoor tiles
        step = scale / rng.uniform(3, 6)
        grout = ((x % step) < 1.5) | ((y % step) < 1.5)
        t = 0.25 * _smooth_noise(rng, h, w, scale // 2) + 0.75 * grout
    img = c1[None, None] * (1 - t[..., None]) + c2[None, None] * t[..., None]
    return img.astype(np.float32)


def _clutter(rng: np.random.Generator, img: np.ndarray, count: tuple[int, int]) -> None:
    """Amoeba-shaped distractors in object colours and textures: background, yet object-like."""
    h, w = img.shape[:2]
    for _ in range(rng.integers(count[0], count[1] + 1)):
        size = int(min(h, w) * rng.uniform(0.08, 0.25))
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        y0, y1, x0, x1 = max(0, cy - size), min(h, cy + size), max(0, cx - size), min(w, cx + size)
        if y1 - y0 < 3 or x1 - x0 < 3:
            continue
        hh, ww = y1 - y0, x1 - x0
        yy, xx = np.mgrid[0:hh, 0:ww].astype(np.float32)
        r = np.hypot((yy - (cy - y0)) / size, (xx - (cx - x0)) / size)
        blob = r + 0.7 * (_smooth_noise(rng, hh, ww, max(2, size // 2)) - 0.5) < 0.8
        u, v = (xx - (cx - x0)) / size, (yy - (cy - y0)) / size
        pattern = _pattern(rng, CLUTTER_TEXTURES[rng.integers(len(CLUTTER_TEXTURES))], u, v, size)[..., None]
        hues = list(HUES)
        c1 = _jitter_colour(rng, hues[rng.integers(len(hues))])
        c2 = _jitter_colour(rng, hues[rng.integers(len(hues))])
        patch = c1 * (1 - pattern) + c2 * pattern
        img[y0:y1, x0:x1][blob] = patch[blob]


@dataclass
class SampleObject:
    cls: int          # 0-based class index
    mask: np.ndarray  # visible pixels
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 of the visible mask, inclusive


@dataclass
class Sample:
    image: np.ndarray        # (H, W, 3) uint8
    semantic: np.ndarray     # class indices with 255 borders
    instances: np.ndarray    # instance indices 1..n with 255 borders
    parts: np.ndarray        # part indices (part label space) with 255 borders
    objects: list[SampleObject]
    scene: str


def render_sample(seed: int, split: str, index: int, profile: Profile) -> Sample:
    """Draw one image and all its annotations; deterministic in (seed, split, index)."""
    # Pretraining renders (stages.pretrain.train) draw from seed spaces of their own, apart from any dataset split.
    split_code = {"train": 0, "val": 1, "pretrain": 3, "pretrain-eval": 4}.get(split, 2)
    rng = np.random.default_rng([seed, split_code, index])
    h, w = profile.height, profile.width
    n_objects = int(rng.choice(np.arange(1, len(profile.object_counts) + 1), p=profile.object_counts))

    first = int(rng.integers(len(CLASSES)))
    scene = CLASSES[first].home if rng.random() < profile.home_bias else SCENES[rng.integers(len(SCENES))]
    at_home = [i for i, c in enumerate(CLASSES) if c.home == scene]
    classes = [first]
    for _ in range(n_objects - 1):
        if at_home and rng.random() < profile.home_cooccurrence:
            classes.append(int(rng.choice(at_home)))
        else:
            classes.append(int(rng.integers(len(CLASSES))))

    img = _scene(rng, scene, h, w)
    _clutter(rng, img, profile.clutter)
    owner = np.zeros((h, w), np.int32)       # instance id per pixel (0 = background)
    part_map = np.zeros((h, w), np.int32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    short = min(h, w)
    placed: list[int] = []
    for cls in classes:
        spec = CLASSES[cls]
        for _attempt in range(6):
            size = short * profile.min_size * np.exp(rng.uniform(0, np.log(4.0)))
            cy, cx = rng.uniform(0.1 * h, 0.9 * h), rng.uniform(0.1 * w, 0.9 * w)
            theta = rng.uniform(-spec.max_rotation, spec.max_rotation)
            aspect = rng.uniform(0.8, 1.25)
            du, dv = xx - cx, yy - cy
            u = (du * np.cos(theta) + dv * np.sin(theta)) / (size * aspect)
            v = (-du * np.sin(theta) + dv * np.cos(theta)) / (size / aspect)
            inside, part = shape_and_parts(cls, u, v)
            if inside.sum() < 12:
                continue
            # Keep the object only if occluding earlier ones leaves each of them mostly visible.
            trial = np.where(inside, len(placed) + 1, owner)
            ok = all((trial == k).sum() >= 0.35 * (owner == k).sum() and (trial == k).sum() >= 12
                     for k in range(1, len(placed) + 1))
            if ok:
                break
        else:
            continue
        placed.append(cls)
        owner = trial
        part_map = np.where(inside, PART_OFFSETS[cls] + part, part_map)
        # A primary texture of its own (85%), a secondary one shared with another class (10%), or any.
        draw = rng.random()
        texture = spec.textures[0] if draw < 0.85 else spec.textures[1] if draw < 0.95 else \
            TEXTURES[rng.integers(len(TEXTURES))]
        pattern = _pattern(rng, texture, u, v, size)[..., None]
        c1 = _jitter_colour(rng, spec.colours[rng.integers(len(spec.colours))])
        c2 = c1 * rng.uniform(0.3, 0.55) if rng.random() < 0.6 else \
            _jitter_colour(rng, spec.colours[rng.integers(len(spec.colours))])
        shade = 1.0 + 0.25 * (u * np.cos(theta) - v * np.sin(theta))[..., None] * rng.uniform(-1, 1)
        colour = (c1 * (1 - pattern) + c2 * pattern) * np.clip(shade, 0.6, 1.4)
        img = np.where(inside[..., None], colour, img)

    if not placed:  # every attempt failed: fall back to one mid-sized object in the middle
        return render_sample(seed + 7919, split, index, profile)

    # Photometric finish: illumination gradient, slight blur (anti-aliasing), sensor noise.
    gain = 1 + 0.2 * (xx / w - 0.5) * rng.uniform(-1, 1) + 0.2 * (yy / h - 0.5) * rng.uniform(-1, 1)
    img = img * gain[..., None]
    img = cv2.GaussianBlur(img, (0, 0), 0.6)
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)

    # VOC-style ignore band wherever a window of the border width sees two different owners.
    k = 2 * profile.border + 1
    kernel = np.ones((k, k), np.uint8)
    hi = cv2.dilate(owner.astype(np.float32), kernel)
    lo = cv2.erode(owner.astype(np.float32), kernel)
    band = hi != lo
    semantic_of = np.array([0] + [c + 1 for c in placed], np.int32)
    semantic = np.where(band, 255, semantic_of[owner]).astype(np.uint8)
    instances = np.where(band, 255, owner).astype(np.uint8)
    parts = np.where(band, 255, part_map).astype(np.uint8)

    objects = []
    for k_obj, cls in enumerate(placed, start=1):
        mask = owner == k_obj
        ys, xs = np.nonzero(mask)
        objects.append(SampleObject(cls, mask, (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))))
    return Sample(img, semantic, instances, parts, objects, scene)


# ------------------------------------------------------------------------------------ weak annotations

def sample_points(rng: np.random.Generator, sample: Sample) -> list[dict]:
    """One click per object inside its visible interior, plus background clicks."""
    points = []
    names = label_space().names
    for obj in sample.objects:
        interior = cv2.erode(obj.mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        ys, xs = np.nonzero(interior if interior.any() else obj.mask)
        j = rng.integers(len(ys))
        points.append({"class": names[obj.cls + 1], "x": int(xs[j]), "y": int(ys[j])})
    ys, xs = np.nonzero(sample.semantic == 0)
    for j in rng.choice(len(ys), size=min(2, len(ys)), replace=False):
        points.append({"class": "background", "x": int(xs[j]), "y": int(ys[j])})
    return points


def sample_scribbles(rng: np.random.Generator, sample: Sample) -> np.ndarray:
    """Strokes through each object's interior and across the background; 255 elsewhere."""
    h, w = sample.semantic.shape
    scribbles = np.full((h, w), 255, np.uint8)
    thickness = max(1, min(h, w) // 80)

    def stroke(region: np.ndarray, label: int, n_vertices: int) -> None:
        ys, xs = np.nonzero(region)
        if len(ys) == 0:
            return
        canvas = np.zeros((h, w), np.uint8)
        pick = rng.choice(len(ys), size=min(n_vertices, len(ys)), replace=False)
        pts = np.stack([xs[pick], ys[pick]], 1).astype(np.int32)
        pts = pts[np.argsort(pts[:, 0] + pts[:, 1])]
        cv2.polylines(canvas, [pts.reshape(-1, 1, 2)], False, 1, thickness)
        if len(pts) == 1:
            canvas[pts[0, 1], pts[0, 0]] = 1
        scribbles[(canvas > 0) & region] = label

    for obj in sample.objects:
        interior = cv2.erode(obj.mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        stroke(interior if interior.any() else obj.mask, obj.cls + 1, 3)
    stroke(sample.semantic == 0, 0, 5)
    return scribbles


def annotation_xml(image_id: str, sample: Sample) -> str:
    h, w = sample.semantic.shape
    names = label_space().names
    root = ElementTree.Element("annotation")
    ElementTree.SubElement(root, "folder").text = "WSSS-synthetic"
    ElementTree.SubElement(root, "filename").text = f"{image_id}.jpg"
    size = ElementTree.SubElement(root, "size")
    for tag, value in (("width", w), ("height", h), ("depth", 3)):
        ElementTree.SubElement(size, tag).text = str(value)
    ElementTree.SubElement(root, "segmented").text = "1"
    ElementTree.SubElement(root, "scene").text = sample.scene
    for obj in sample.objects:
        node = ElementTree.SubElement(root, "object")
        ElementTree.SubElement(node, "name").text = names[obj.cls + 1]
        ElementTree.SubElement(node, "pose").text = "Unspecified"
        x0, y0, x1, y1 = obj.box
        truncated = int(x0 == 0 or y0 == 0 or x1 == w - 1 or y1 == h - 1)
        ElementTree.SubElement(node, "truncated").text = str(truncated)
        ElementTree.SubElement(node, "difficult").text = "0"
        box = ElementTree.SubElement(node, "bndbox")
        # VOC boxes are 1-based and inclusive.
        for tag, value in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1 + 1), ("ymax", y1 + 1)):
            ElementTree.SubElement(box, tag).text = str(value)
    ElementTree.indent(root)
    return ElementTree.tostring(root, encoding="unicode")


# ------------------------------------------------------------------------------------------- writing

def image_ids(profile: Profile) -> dict[str, list[str]]:
    train = [f"syn_{i:06d}" for i in range(profile.n_train)]
    val = [f"syn_{profile.n_train + i:06d}" for i in range(profile.n_val)]
    return {"train": train, "val": val}


def _write_one(root: Path, split: str, index: int, image_id: str, seed: int, profile: Profile) -> None:
    sample = render_sample(seed, split, index, profile)
    rng = np.random.default_rng([seed, 99, index, 0 if split == "train" else 1])
    palette = voc_palette()
    write_jpeg(root / "JPEGImages" / f"{image_id}.jpg", sample.image)
    write_label_png(root / "SegmentationClass" / f"{image_id}.png", sample.semantic, palette)
    write_label_png(root / "SegmentationObject" / f"{image_id}.png", sample.instances, palette)
    write_label_png(root / "SegmentationPart" / f"{image_id}.png", sample.parts, palette)
    write_label_png(root / "Scribbles" / f"{image_id}.png", sample_scribbles(rng, sample), palette)
    (root / "Points" / f"{image_id}.json").write_text(json.dumps(sample_points(rng, sample)))
    (root / "Annotations" / f"{image_id}.xml").write_text(annotation_xml(image_id, sample))


def _write_range(args: tuple) -> None:
    root, split, start, ids, seed, profile = args
    for offset, image_id in enumerate(ids):
        _write_one(Path(root), split, start + offset, image_id, seed, profile)


def write_dataset(out: str | os.PathLike, profile: str | Profile = "demo", seed: int = 0,
                  processes: int = 1) -> Path:
    """Generate the dataset into ``out`` (VOC layout), atomically: ``out`` appears only when complete."""
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    if isinstance(profile, str) and profile not in PROFILES:
        raise KeyError(f"unknown synthetic profile {profile!r}; choose from {sorted(PROFILES)}")
    out = Path(out)
    with atomic_path(out, directory=True) as tmp:
        for sub in ("JPEGImages", "SegmentationClass", "SegmentationObject", "SegmentationPart",
                    "Scribbles", "Points", "Annotations", "ImageSets/Segmentation"):
            (tmp / sub).mkdir(parents=True, exist_ok=True)
        ids = image_ids(prof)
        jobs = []
        for split, split_ids in ids.items():
            step = max(1, len(split_ids) // max(1, processes * 4))
            for start in range(0, len(split_ids), step):
                jobs.append((str(tmp), split, start, split_ids[start:start + step], seed, prof))
        if processes > 1:
            import multiprocessing as mp
            with mp.get_context("spawn").Pool(processes) as pool:
                pool.map(_write_range, jobs)
        else:
            for job in jobs:
                _write_range(job)
        for split, split_ids in ids.items():
            (tmp / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(split_ids) + "\n")
        label_space().save(tmp / "labelspace.json")
        part_space().save(tmp / "parts.json")
        (tmp / "dataset.json").write_text(json.dumps({
            "generator": "wsss.synthetic", "generator_version": GENERATOR_VERSION, "seed": seed,
            "profile": asdict(prof), "home_scene": {c.name: c.home for c in CLASSES},
        }, indent=1))
    return out

"""Co-occurrence: which classes of the final pseudo labels learned their context instead of their object.

WSSS's best-known failure (boat/water, train/rail on VOC): a class whose objects nearly always sit on one
background gets a CAM that fires on that background, pseudo labels that paint it, and a DeepLab that paints it on
val too. Per foreground class c of the pseudo labels DeepLab trains on, on the eval images (GT 255 ignored):

- ``on_background``: the share of c's pseudo-label pixels that GT calls background;
- ``recall``: the share of GT-c pixels labelled c (a class can spill onto its context and still cover its objects);
- its top background context. Where the dataset annotates one per image (the synthetic data's ``<scene>`` in
  ``Annotations/<id>.xml``), c's background-labelled pixels are counted per scene and the top scene is given with
  its share of them. Without scenes (a plain VOC layout), the context is the GT class most often present in the
  images where c spills onto background, weighted by the spilled pixels, with the share of c's spilled pixels that
  lie in images containing it (shares then need not sum to 1); '-' when c never spills or spills alone;
- ``val_background_painted``: the share of val GT-background pixels that DeepLab's val prediction (EvalSegmentation's
  label PNGs) labels c: what the context learned in the pseudo labels costs on unseen images.

A class is flagged when ``on_background`` reaches the ``[Report] cooccurrence_flag`` threshold. Every count comes
from one joint ``np.bincount`` of (GT, label) per image, O(pixels); Python loops run over images and classes only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree

import numpy as np

from data.artifacts import LABELS, label_file
from data.io import BadInputError, read_label_png
from data.manifest import Manifest

IGNORE = 255
SCENE_CONTEXT, CLASS_CONTEXT = "scene", "class"
NO_SCENE = "(no scene)"   # an image without a <scene> in a dataset whose other images have one


@dataclass(frozen=True)
class ClassCooccurrence:
    """One foreground class's figures; shares are fractions, None where undefined (no pixels to divide by)."""

    name: str
    labelled: int                       # its pseudo-label pixels where GT is not 255
    on_background: float | None         # share of them GT calls background
    recall: float | None                # share of GT pixels of the class labelled as it
    context: str | None                 # top background context (a scene or a GT class); None = '-'
    context_share: float | None
    val_background_painted: float | None  # share of val GT-background pixels DeepLab predicts as the class
    flagged: bool


@dataclass(frozen=True)
class Cooccurrence:
    """The report's co-occurrence table: foreground classes in label-space order."""

    classes: list[ClassCooccurrence]
    context_kind: str                   # SCENE_CONTEXT or CLASS_CONTEXT: what ``context`` names
    threshold: float                    # [Report] cooccurrence_flag
    images: int                         # eval images counted
    val_images: int = 0                 # val predictions counted; 0 = none read (the column shows '-')
    flagged: list[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "flagged", [c.name for c in self.classes if c.flagged])


def joint_counts(gt: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K + 1) pixel counts: rows the GT class, columns the label (the last column: unlabelled, 255); pixels with
    GT 255 are left out."""
    if gt.shape != labels.shape:
        raise ValueError(f"GT is {gt.shape} but the labels are {labels.shape}")
    valid = gt != IGNORE
    rows = gt[valid].astype(np.int64)
    columns = np.minimum(labels[valid].astype(np.int64), num_classes)  # 255 and above: unlabelled
    if rows.size and rows.max() >= num_classes:
        raise ValueError(f"GT value {int(rows.max())} is outside the {num_classes} classes")
    width = num_classes + 1
    return np.bincount(rows * width + columns, minlength=num_classes * width).reshape(num_classes, width)


class CooccurrenceTally:
    """Counts accumulated image by image; :meth:`result` turns them into shares."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        k = len(self.names)
        self.counts = np.zeros((k, k + 1), np.int64)        # eval images: GT x pseudo label
        self.by_scene: dict[str, np.ndarray] = {}           # scene -> per label class, its pixels on GT background
        self.by_class = np.zeros((k, k), np.int64)          # [GT class present, label class] spilled pixels
        self.val_background = np.zeros(k + 1, np.int64)     # val GT-background pixels by predicted class
        self.images = self.val_images = 0

    def add(self, gt: np.ndarray, labels: np.ndarray, scene: str | None = None) -> None:
        """One eval image: its GT, its pseudo labels and its scene (None where it has none)."""
        counts = joint_counts(gt, labels, len(self.names))
        self.counts += counts
        spilled = counts[0, :-1]                            # per label class: its pixels on GT background
        present = np.flatnonzero(counts[1:].sum(1)) + 1     # GT foreground classes of the image
        self.by_class[present] += spilled
        self.by_scene.setdefault(scene, np.zeros(len(self.names), np.int64))
        self.by_scene[scene] += spilled
        self.images += 1

    def add_val(self, gt: np.ndarray, prediction: np.ndarray) -> None:
        """One val image: its GT and DeepLab's prediction."""
        self.val_background += joint_counts(gt, prediction, len(self.names))[0]
        self.val_images += 1

    def _context(self, c: int) -> tuple[str | None, float | None]:
        spilled = int(self.counts[0, c])
        scenes = sorted(s for s in self.by_scene if s is not None)
        if spilled == 0 or (not scenes and not self._class_context(c).any()):
            return None, None
        if scenes:
            counts = [(int(self.by_scene[s][c]), s) for s in scenes]
            counts += [(int(self.by_scene[None][c]), NO_SCENE)] if None in self.by_scene else []
            best, name = max(counts, key=lambda pair: pair[0])   # ties: the first in sorted order
            return name, best / spilled
        column = self._class_context(c)
        best = int(np.argmax(column))
        return self.names[best], int(column[best]) / spilled

    def _class_context(self, c: int) -> np.ndarray:
        column = self.by_class[:, c].copy()
        column[[0, c]] = 0      # neither background nor the class itself is its context
        return column

    def result(self, threshold: float) -> Cooccurrence:
        """Per foreground class its shares, top context and flag (``on_background`` >= ``threshold``)."""
        labelled = self.counts[:, :-1].sum(0)
        gt_pixels = self.counts.sum(1)
        background = self.val_background.sum()
        rows = []
        for c in range(1, len(self.names)):
            on_background = _share(self.counts[0, c], labelled[c])
            context, context_share = self._context(c)
            rows.append(ClassCooccurrence(
                name=self.names[c], labelled=int(labelled[c]), on_background=on_background,
                recall=_share(self.counts[c, c], gt_pixels[c]), context=context, context_share=context_share,
                val_background_painted=_share(self.val_background[c], background) if self.val_images else None,
                flagged=on_background is not None and on_background >= threshold))
        kind = SCENE_CONTEXT if any(s is not None for s in self.by_scene) else CLASS_CONTEXT
        return Cooccurrence(rows, kind, threshold, self.images, self.val_images)


def _share(part: int | np.integer, whole: int | np.integer) -> float | None:
    return float(part) / float(whole) if whole > 0 else None


def image_scene(manifest: Manifest, image_id: str) -> str | None:
    """The ``<scene>`` of ``Annotations/<id>.xml``; None without the file or the element."""
    path = manifest.layout.xml_path(image_id)
    if not path.is_file():
        return None
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as err:
        raise BadInputError(path, f"cannot parse XML ({err})") from None
    return (root.findtext("scene") or "").strip() or None


def measure_cooccurrence(manifest: Manifest, labels_dir: Path, threshold: float,
                         predictions_dir: Path | None = None) -> Cooccurrence | None:
    """The table for the pseudo labels under ``labels_dir`` (a stage directory's ``labels/<id>.png``) on the eval
    images and, given ``predictions_dir`` with label PNGs, DeepLab's on val. None when ``labels_dir`` holds no
    label folder (the stage did not run)."""
    if not (Path(labels_dir) / LABELS).is_dir():
        return None
    space = manifest.label_space
    tally = CooccurrenceTally(space.names)
    for image_id in manifest.splits["eval"]:
        gt = manifest.layout.read_label(image_id, evaluation=True)
        labels = read_label_png(label_file(labels_dir, image_id), space, shape=gt.shape)
        tally.add(gt, labels, image_scene(manifest, image_id))
    if predictions_dir is not None and (Path(predictions_dir) / LABELS).is_dir():
        for image_id in manifest.splits["val"]:
            gt = manifest.layout.read_label(image_id, evaluation=True)
            tally.add_val(gt, read_label_png(label_file(predictions_dir, image_id), space, shape=gt.shape))
    return tally.result(threshold)

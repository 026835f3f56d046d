"""Datasets in PASCAL VOC layout: VOC 2012 (+ SBD ``SegmentationClassAug``), the embedded synthetic
set, or any dataset with its own label-space file.

Image ids are strings, never int-parsed (IRN's ``np.loadtxt(dtype=int32)`` breaks on numpy >= 1.23), and
every path built from an id is checked to stay inside the dataset root.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import numpy as np

from data.artifacts import image_id_problem
from data.io import BadInputError, image_size, read_image, read_label_png
from data.labelspace import LabelSpace


def read_id_list(path: str | os.PathLike) -> list[str]:
    """One id per line: UTF-8, blank lines and whole-line ``#`` comments skipped, VOC's optional integer second
    column (``2008_000001 -1``) dropped. Anything that would silently change an id is refused, naming the file
    and line: a byte-order mark, ``#`` or whitespace inside a line's id, or an id in no canonical spelling
    (:func:`data.artifacts.image_id_problem`: ``..``, ``./x``, absolute paths, backslashes, control characters).
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(path, "image list is missing")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadInputError(path, f"image list is not UTF-8 text (byte {err.start}: {err.reason})") from None
    if text.startswith("\ufeff"):
        raise BadInputError(path, "line 1: the file starts with a byte-order mark, which would become part of the "
                                  "first id; save it as UTF-8 without BOM")
    ids: list[str] = []
    where: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        image_id = _id_of_line(path, number, line)
        if image_id is None:
            continue
        if image_id in where:
            raise BadInputError(path, f"line {number}: image id {image_id!r} is listed twice (first on line "
                                      f"{where[image_id]})")
        where[image_id] = number
        ids.append(image_id)
    if not ids:
        raise BadInputError(path, "image list is empty")
    return ids


def _id_of_line(path: Path, number: int, line: str) -> str | None:
    """The id on one line of an id list (None for blank and comment lines), or a BadInputError naming the line."""
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    if "#" in stripped:
        raise BadInputError(path, f"line {number}: {stripped!r} has '#' after the id; ids may not contain '#' and "
                                  "comments must be on a line of their own")
    fields = stripped.split()
    if len(fields) > 2 or (len(fields) == 2 and not fields[1].lstrip("+-").isdigit()):
        raise BadInputError(path, f"line {number}: {stripped!r} is not one id (whitespace inside an id is not "
                                  "allowed; only VOC's integer second column may follow it)")
    problem = image_id_problem(fields[0])
    if problem is not None:
        raise BadInputError(path, f"line {number}: invalid image id {fields[0]!r}: {problem}")
    return fields[0]


@dataclass(frozen=True)
class VOCLayout:
    root: Path
    label_space: LabelSpace
    seg_dir: str = "SegmentationClass"
    eval_seg_dir: str = "SegmentationClass"

    def resolve(self, subdir: str, image_id: str, ext: str) -> Path:
        """``root/subdir/<id><ext>``, refusing ids that escape the root (``..``, absolute paths)."""
        problem = image_id_problem(image_id)
        if problem is not None:
            raise BadInputError(self.root / subdir, f"invalid image id {image_id!r}: {problem}")
        base = (self.root / subdir).resolve()
        path = (base / f"{image_id}{ext}").resolve()
        if not path.is_relative_to(base):
            raise BadInputError(self.root / subdir, f"image id {image_id!r} points outside the dataset root")
        return path

    def image_path(self, image_id: str) -> Path:
        return self.resolve("JPEGImages", image_id, ".jpg")

    def label_path(self, image_id: str, evaluation: bool = False) -> Path:
        return self.resolve(self.eval_seg_dir if evaluation else self.seg_dir, image_id, ".png")

    def xml_path(self, image_id: str) -> Path:
        return self.resolve("Annotations", image_id, ".xml")

    def read_image(self, image_id: str) -> np.ndarray:
        return read_image(self.image_path(image_id))

    def read_label(self, image_id: str, evaluation: bool = False,
                   shape: tuple[int, int] | None = None) -> np.ndarray:
        """Ground-truth class indices; ``shape`` (H, W), when given, must match the PNG's."""
        return read_label_png(self.label_path(image_id, evaluation), self.label_space, shape=shape)

    def _read_xml(self, image_id: str) -> tuple[ElementTree.Element, Path]:
        """The parsed ``Annotations/<id>.xml`` and its path; a missing or malformed file names itself."""
        path = self.xml_path(image_id)
        if not path.is_file():
            raise BadInputError(path, "annotation XML is missing")
        try:
            return ElementTree.parse(path).getroot(), path
        except ElementTree.ParseError as err:
            raise BadInputError(path, f"cannot parse XML ({err})") from None

    def labels_from_xml(self, image_id: str) -> np.ndarray:
        """Multi-hot foreground vector (without background) from the object names in the XML."""
        root, path = self._read_xml(image_id)
        vec = np.zeros(self.label_space.num_classes - 1, np.float32)
        for obj in root.iter("object"):
            name = (obj.findtext("name") or "").strip()
            if name not in self.label_space.names or name == self.label_space.names[0]:
                raise BadInputError(path, f"object class {name!r} is not in the label space")
            vec[self.label_space.index(name) - 1] = 1
        return vec

    # ------------------------------------------------------------------ point / scribble / box annotations

    def points_path(self, image_id: str) -> Path:
        return self.resolve("Points", image_id, ".json")

    def scribble_path(self, image_id: str) -> Path:
        return self.resolve("Scribbles", image_id, ".png")

    def read_points(self, image_id: str) -> list[tuple[int, int, int]]:
        """``Points/<id>.json`` (a list of {"class": name, "x": col, "y": row}, 0-based pixels, background
        clicks included) as (label id, x, y) tuples. The image bounds are checked by the caller."""
        path = self.points_path(image_id)
        if not path.is_file():
            raise BadInputError(path, "point annotation file is missing")
        try:
            entries = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadInputError(path, f"not valid JSON ({err})") from None
        if not isinstance(entries, list):
            raise BadInputError(path, f"expected a list of points, found {type(entries).__name__}")
        points = []
        for n, entry in enumerate(entries):
            if not isinstance(entry, dict) or not {"class", "x", "y"} <= entry.keys():
                raise BadInputError(path, f"point {n} must be an object with 'class', 'x' and 'y', got {entry!r}")
            name, x, y = entry["class"], entry["x"], entry["y"]
            if name not in self.label_space.names:
                raise BadInputError(path, f"point {n}: class {name!r} is not in the label space")
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in (x, y)):
                raise BadInputError(path, f"point {n}: x and y must be non-negative integers, got ({x!r}, {y!r})")
            points.append((self.label_space.index(name), x, y))
        return points

    def read_scribble(self, image_id: str) -> np.ndarray:
        """``Scribbles/<id>.png``: label ids (uint8, H x W) on the strokes, 255 = unlabelled."""
        return read_label_png(self.scribble_path(image_id), self.label_space)

    def read_boxes(self, image_id: str, size: tuple[int, int] | None = None) -> np.ndarray:
        """Object boxes from ``Annotations/<id>.xml`` as int64 (M, 5) rows (label id, x0, y0, x1, y1).

        VOC boxes are 1-based and inclusive; the result is 0-based and inclusive (each coordinate minus 1,
        fractional values rounded), clipped to the image. ``size`` = (height, width); without it the XML's
        ``<size>`` is used, or, where that is missing or zero, the image file's header.
        """
        root, path = self._read_xml(image_id)
        if size is None:
            size = self._xml_size(root, path) or self._image_size(image_id)
        height, width = size
        boxes = []
        for n, obj in enumerate(root.iter("object")):
            name = (obj.findtext("name") or "").strip()
            if name not in self.label_space.names or name == self.label_space.names[0]:
                raise BadInputError(path, f"object {n}: class {name!r} is not in the label space")
            bndbox = obj.find("bndbox")
            if bndbox is None:
                raise BadInputError(path, f"object {n} ({name}) has no <bndbox>")
            try:
                x0, y0, x1, y1 = (round(float(bndbox.findtext(tag) or "")) - 1
                                  for tag in ("xmin", "ymin", "xmax", "ymax"))
            except (ValueError, OverflowError):
                raise BadInputError(path, f"object {n} ({name}): <bndbox> needs finite numeric xmin, ymin, xmax, "
                                          "ymax") from None
            if x1 < x0 or y1 < y0:
                raise BadInputError(path, f"object {n} ({name}): box max corner lies before its min corner")
            x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width - 1), min(y1, height - 1)
            if x1 < x0 or y1 < y0:
                raise BadInputError(path, f"object {n} ({name}): box lies outside the {width}x{height} image")
            boxes.append((self.label_space.index(name), x0, y0, x1, y1))
        return np.asarray(boxes, np.int64).reshape(-1, 5)

    @staticmethod
    def _xml_size(root: ElementTree.Element, path: Path) -> tuple[int, int] | None:
        node = root.find("size")
        if node is None:
            return None
        try:
            height, width = int(node.findtext("height") or 0), int(node.findtext("width") or 0)
        except ValueError:
            raise BadInputError(path, "<size> height and width must be integers") from None
        return (height, width) if height > 0 and width > 0 else None

    def _image_size(self, image_id: str) -> tuple[int, int]:
        return image_size(self.image_path(image_id))  # reads the header only

    def labels_from_mask(self, image_id: str) -> np.ndarray:
        labels = self.read_label(image_id)
        present = np.unique(labels)
        present = present[(present > 0) & (present != self.label_space.ignore_index)]
        vec = np.zeros(self.label_space.num_classes - 1, np.float32)
        vec[present.astype(int) - 1] = 1
        return vec

    def image_labels(self, image_id: str, source: str = "xml") -> np.ndarray:
        if source == "xml":
            return self.labels_from_xml(image_id)
        if source == "mask":
            return self.labels_from_mask(image_id)
        raise ValueError(f"image labels come from 'xml' or 'mask', not {source!r}")

    def check(self, image_id: str, labels_from: str, with_mask: bool, max_pixels: int = 0,
              train_mask: bool = False) -> np.ndarray:
        """Validate one image fully (decodes it); returns its image-level labels or raises BadInputError.

        ``max_pixels`` (> 0) refuses a larger image from its header, before decoding it; ``with_mask`` checks the
        evaluation mask (``eval_seg_dir``), ``train_mask`` the training mask (``seg_dir``, what the fully supervised
        ceiling trains on) where one exists: a bad mask is found now, not hours later in training.
        """
        if max_pixels > 0:
            height, width = self._image_size(image_id)
            if height * width > max_pixels:
                raise BadInputError(self.image_path(image_id),
                                    f"image is {width}x{height} = {height * width:,} pixels, above [PrepareDataset] "
                                    f"max_pixels = {max_pixels:,} (raise it if the machine has the memory)")
        image = self.read_image(image_id)
        labels = self.image_labels(image_id, labels_from)
        if with_mask:
            mask = self.read_label(image_id, evaluation=True)
            if mask.shape != image.shape[:2]:
                raise BadInputError(self.label_path(image_id, True),
                                    f"label size {mask.shape} differs from image size {image.shape[:2]}")
        if train_mask and not (with_mask and self.seg_dir == self.eval_seg_dir):  # not read above
            if self.label_path(image_id).is_file():  # weak-label datasets may have none: only the ceiling needs it
                self.read_label(image_id, shape=image.shape[:2])
        if not labels.any():
            raise BadInputError(self.image_path(image_id), "image has no foreground class")
        return labels

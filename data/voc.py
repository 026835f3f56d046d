"""Datasets in PASCAL VOC layout: VOC 2012 (+ SBD ``SegmentationClassAug``), the embedded synthetic
set, or any dataset with its own label-space file.

Image ids are strings, never int-parsed (IRN's ``np.loadtxt(dtype=int32)`` breaks on numpy >= 1.23), and
every path built from an id is checked to stay inside the dataset root.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import numpy as np

from data.io import BadInputError, read_image, read_label_png
from data.labelspace import LabelSpace


def read_id_list(path: str | os.PathLike) -> list[str]:
    """One id per line; blank lines and ``#`` comments skipped; VOC's optional second column dropped."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(path, "image list is missing")
    ids = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            ids.append(line.split()[0])
    if not ids:
        raise BadInputError(path, "image list is empty")
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise BadInputError(path, f"image id {dup!r} is listed twice")
    return ids


@dataclass(frozen=True)
class VOCLayout:
    root: Path
    label_space: LabelSpace
    seg_dir: str = "SegmentationClass"
    eval_seg_dir: str = "SegmentationClass"

    def resolve(self, subdir: str, image_id: str, ext: str) -> Path:
        """``root/subdir/<id><ext>``, refusing ids that escape the root (``..``, absolute paths)."""
        if not image_id or "\x00" in image_id or os.path.isabs(image_id):
            raise BadInputError(self.root / subdir, f"invalid image id {image_id!r}")
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

    def read_label(self, image_id: str, evaluation: bool = False) -> np.ndarray:
        return read_label_png(self.label_path(image_id, evaluation), self.label_space)

    def labels_from_xml(self, image_id: str) -> np.ndarray:
        """Multi-hot foreground vector (without background) from the object names in the XML."""
        path = self.xml_path(image_id)
        if not path.is_file():
            raise BadInputError(path, "annotation XML is missing")
        try:
            root = ElementTree.parse(path).getroot()
        except ElementTree.ParseError as err:
            raise BadInputError(path, f"cannot parse XML ({err})") from None
        vec = np.zeros(self.label_space.num_classes - 1, np.float32)
        for obj in root.iter("object"):
            name = (obj.findtext("name") or "").strip()
            if name not in self.label_space.names or name == self.label_space.names[0]:
                raise BadInputError(path, f"object class {name!r} is not in the label space")
            vec[self.label_space.index(name) - 1] = 1
        return vec

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

    def check(self, image_id: str, labels_from: str, with_mask: bool) -> np.ndarray:
        """Validate one image fully (decodes it); returns its image-level labels or raises BadInputError."""
        image = self.read_image(image_id)
        labels = self.image_labels(image_id, labels_from)
        if with_mask:
            mask = self.read_label(image_id, evaluation=True)
            if mask.shape != image.shape[:2]:
                raise BadInputError(self.label_path(image_id, True),
                                    f"label size {mask.shape} differs from image size {image.shape[:2]}")
        if not labels.any():
            raise BadInputError(self.image_path(image_id), "image has no foreground class")
        return labels

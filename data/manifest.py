"""The dataset manifest every stage reads: root, label space, id lists, image-level labels, quarantine."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data.io import read_json, write_json
from data.labelspace import LabelSpace
from data.voc import VOCLayout

MANIFEST = "manifest.json"


@dataclass
class Manifest:
    root: Path
    label_space: LabelSpace
    splits: dict[str, list[str]]            # train / eval / val -> ids (quarantined ids removed)
    image_labels: dict[str, list[int]]      # id -> foreground class indices (1-based label-space indices)
    seg_dir: str = "SegmentationClass"
    eval_seg_dir: str = "SegmentationClass"
    quarantine: list[dict] = field(default_factory=list)
    # id -> digest of the bytes of its files (image, XML, masks, annotations) for an external dataset: an edited file
    # changes the manifest, and so the keys of every stage that reads the dataset
    contents: dict[str, str] = field(default_factory=dict)

    @property
    def layout(self) -> VOCLayout:
        return VOCLayout(self.root, self.label_space, self.seg_dir, self.eval_seg_dir)

    def multi_hot(self, image_id: str) -> np.ndarray:
        vec = np.zeros(self.label_space.num_classes - 1, np.float32)
        vec[np.asarray(self.image_labels[image_id], int) - 1] = 1
        return vec

    def to_dict(self) -> dict:
        return {"root": str(self.root), "label_space": self.label_space.to_dict(), "splits": self.splits,
                "image_labels": self.image_labels, "seg_dir": self.seg_dir, "eval_seg_dir": self.eval_seg_dir,
                "quarantine": self.quarantine, "contents": self.contents}

    def save(self, directory: str | os.PathLike) -> None:
        write_json(Path(directory) / MANIFEST, self.to_dict())

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Manifest:
        path = Path(directory) / MANIFEST
        spec = read_json(path)
        root = Path(spec["root"])
        if not root.is_absolute():  # the embedded dataset lives inside the stage directory
            root = Path(directory) / root
        return cls(root=root, label_space=LabelSpace.from_dict(spec["label_space"], str(path)),
                   splits=spec["splits"], image_labels=spec["image_labels"], seg_dir=spec["seg_dir"],
                   eval_seg_dir=spec["eval_seg_dir"], quarantine=spec.get("quarantine", []),
                   contents=spec.get("contents", {}))

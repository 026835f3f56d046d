"""Part label spaces: the part classes, and the object each part belongs to.

A ``parts.json`` is a label-space file (``names``, ``palette``, background 0, ignore 255) plus
``"object_of_part"``: for each part index, the index of its object in the dataset's object label space
(part 0 = background = object 0). The embedded dataset writes one (``data.synthetic.part_space``); a
VOC-layout part dataset brings its own, or names a built-in table: ``pascal_part_58`` (BSANet's split, as
LTTM/GMNet's ``utils/general_utils.py``) or ``pascal_part_108`` (GMNet's), both over the 21 VOC objects.

:class:`PartLayout` reads the part label PNGs of a VOC-layout root (``SegmentationPart/<id>.png`` by
default; GMNet's ``label58/gray/all`` works the same through ``part_dir``) with the object maps' bad-input
rules, plus one of its own: a part map whose object (``object_of_part[part]``) disagrees with the object
label map beyond ``band`` pixels of an object border is refused, naming the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from data.io import BadInputError, read_label_png
from data.labelspace import VOC_CLASSES, LabelSpace

IGNORE = 255

# Parts per VOC object, in VOC order (background first), as LTTM/GMNet's index ranges.
PASCAL_PART_58 = (
    ("background",), ("body", "engine", "wing", "stern", "wheel"), ("wheel", "body"),
    ("head", "wing", "leg", "torso"), ("boat",), ("cap", "body"), ("window", "wheel", "body"),
    ("window", "wheel", "light", "plate", "body"), ("head", "leg", "tail", "torso"), ("chair",),
    ("head", "tail", "leg", "torso"), ("table",), ("head", "leg", "tail", "torso"),
    ("head", "tail", "leg", "torso"), ("wheel", "body"),
    ("head", "torso", "lower_arm", "upper_arm", "lower_leg", "upper_leg"), ("pot", "plant"),
    ("head", "leg", "torso"), ("sofa",), ("train",), ("screen", "frame"),
)
PASCAL_PART_108 = (
    ("background",), ("body", "stern", "wing", "engine", "wheel"),
    ("front_wheel", "saddle", "handlebar", "chainwheel"),
    ("head", "beak", "torso", "neck", "wing", "leg", "foot", "tail"), ("boat",), ("cap", "body"),
    ("side", "roof", "mirror", "plate", "door", "wheel", "headlight", "window"),
    ("side", "roof", "plate", "door", "wheel", "headlight", "window"),
    ("head", "eye", "ear", "nose", "torso", "neck", "leg", "paw", "tail"), ("chair",),
    ("head", "ear", "muzzle", "horn", "torso", "neck", "leg", "tail"), ("table",),
    ("head", "eye", "ear", "nose", "torso", "neck", "leg", "paw", "tail", "muzzle"),
    ("head", "ear", "muzzle", "torso", "neck", "leg", "tail", "hoof"),
    ("front_wheel", "handlebar", "saddle", "headlight"),
    ("head", "eye", "ear", "nose", "mouth", "hair", "torso", "neck", "upper_arm", "hand", "upper_leg", "foot"),
    ("pot", "plant"), ("head", "ear", "muzzle", "horn", "torso", "neck", "leg", "tail"), ("sofa",),
    ("head", "head_side", "head_roof", "headlight", "coach", "coach_side", "coach_roof"), ("screen",),
)


@dataclass(frozen=True)
class PartSpace:
    """Part classes (``parts``, background = part 0) and ``object_of_part`` into ``objects``."""

    parts: LabelSpace
    objects: LabelSpace
    object_of_part: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.object_of_part) != self.parts.num_classes:
            raise ValueError(f"object_of_part has {len(self.object_of_part)} entries for "
                             f"{self.parts.num_classes} parts")
        if self.object_of_part[0] != 0:
            raise ValueError("part 0 (background) must belong to object 0 (background)")
        bad = [o for o in self.object_of_part if not 0 <= o < self.objects.num_classes]
        if bad:
            raise ValueError(f"object_of_part values {sorted(set(bad))} are outside the object space "
                             f"0..{self.objects.num_classes - 1}")
        orphans = sorted(set(range(self.objects.num_classes)) - set(self.object_of_part))
        if orphans:
            raise ValueError(f"objects {[self.objects.names[o] for o in orphans]} have no part")

    @property
    def num_parts(self) -> int:
        return self.parts.num_classes

    @property
    def num_objects(self) -> int:
        return self.objects.num_classes

    def lookup(self) -> np.ndarray:
        """uint8 table of 256 entries: part index -> object index, 255 -> 255 (index it with a part map)."""
        table = np.full(256, IGNORE, np.uint8)
        table[:self.num_parts] = self.object_of_part
        return table

    def parts_of(self, obj: int) -> list[int]:
        return [p for p, o in enumerate(self.object_of_part) if o == obj]

    def to_dict(self) -> dict:
        return {**self.parts.to_dict(), "object_of_part": list(self.object_of_part)}

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike, objects: LabelSpace) -> PartSpace:
        path = Path(path)
        if not path.is_file():
            raise BadInputError(path, "part label space (parts.json) is missing")
        try:
            spec = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadInputError(path, f"not valid JSON ({err})") from None
        if not isinstance(spec, dict) or "object_of_part" not in spec:
            raise BadInputError(path, "needs an 'object_of_part' list (the object index of each part)")
        mapping = spec["object_of_part"]
        if not isinstance(mapping, list) or not all(isinstance(o, int) and not isinstance(o, bool)
                                                    for o in mapping):
            raise BadInputError(path, "'object_of_part' must be a list of integers")
        try:
            return cls(LabelSpace.from_dict(spec, str(path)), objects, tuple(mapping))
        except ValueError as err:
            raise BadInputError(path, str(err).removeprefix(f"{path}: ")) from None


def from_groups(groups: tuple[tuple[str, ...], ...], objects: LabelSpace) -> PartSpace:
    """A part space from each object's part names (background's single part first): names ``object.part``."""
    names, owner = ["background"], [0]
    for obj, parts in enumerate(groups[1:], start=1):
        names += [f"{objects.names[obj]}.{p}" for p in parts]
        owner += [obj] * len(parts)
    return PartSpace(LabelSpace(tuple(names)), objects, tuple(owner))


BUILTIN = {"pascal_part_58": PASCAL_PART_58, "pascal_part_108": PASCAL_PART_108}


def load_part_space(spec: str, root: str | os.PathLike, objects: LabelSpace) -> PartSpace:
    """``spec``: a built-in table's name, or a parts.json path (relative paths from the dataset root)."""
    if spec in BUILTIN:
        if objects.names != VOC_CLASSES:
            raise ValueError(f"part_space = {spec} is defined over the 21 VOC objects; this dataset's objects are "
                             f"{list(objects.names)}")
        return from_groups(BUILTIN[spec], objects)
    path = Path(spec).expanduser()
    return PartSpace.load(path if path.is_absolute() else Path(root) / path, objects)


def owner_disagreement(parts: np.ndarray, objects: np.ndarray, space: PartSpace, band: int) -> np.ndarray:
    """Pixels where the part's object differs from the object label, both valid, farther than ``band`` pixels
    from an object border (a change of object label or a 255 pixel): annotators' borders may differ that much."""
    implied = space.lookup()[parts]
    wrong = (implied != objects) & (parts != IGNORE) & (objects != IGNORE)
    if band > 0 and wrong.any():
        k = np.ones((2 * band + 1, 2 * band + 1), np.uint8)
        hi, lo = cv2.dilate(objects, k), cv2.erode(objects, k)
        wrong &= hi == lo  # a window that sees one object label only: no border within the band
    return wrong


@dataclass(frozen=True)
class PartLayout:
    """Part label maps of a VOC-layout root, checked against the part space and the object label maps."""

    root: Path
    space: PartSpace
    part_dir: str = "SegmentationPart"
    object_dir: str = "SegmentationClass"
    band: int = 2

    def part_path(self, image_id: str) -> Path:
        base = (Path(self.root) / self.part_dir).resolve()
        path = (base / f"{image_id}.png").resolve()
        if not image_id or not path.is_relative_to(base):
            raise BadInputError(base, f"image id {image_id!r} points outside the part folder")
        return path

    def object_path(self, image_id: str) -> Path:
        return Path(self.root) / self.object_dir / f"{image_id}.png"

    def read_parts(self, image_id: str, shape: tuple[int, int] | None = None) -> np.ndarray:
        return read_label_png(self.part_path(image_id), self.space.parts, shape=shape)

    def read_objects(self, image_id: str, shape: tuple[int, int] | None = None) -> np.ndarray:
        return read_label_png(self.object_path(image_id), self.space.objects, shape=shape)

    def read(self, image_id: str, shape: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(part map, object map) of one image, their owners checked to agree outside the border band."""
        parts = self.read_parts(image_id, shape)
        objects = self.read_objects(image_id, parts.shape)
        wrong = owner_disagreement(parts, objects, self.space, self.band)
        if wrong.any():
            y, x = (int(v[0]) for v in np.nonzero(wrong))
            raise BadInputError(self.part_path(image_id),
                                f"{int(wrong.sum())} part pixels belong to another object than "
                                f"{self.object_path(image_id)} says, farther than {self.band} px from an object "
                                f"border (first at row {y}, column {x}: part "
                                f"{self.space.parts.names[parts[y, x]]!r}, object "
                                f"{self.space.objects.names[objects[y, x]]!r})")
        return parts, objects

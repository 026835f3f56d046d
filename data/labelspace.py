"""Label spaces: class names, palette, background and ignore indices.

A label space travels with every label artifact (PNG has no room for it), so seeds, pseudo labels and
predictions written by different stages can always be decoded and checked against the same definition.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IGNORE_INDEX = 255
BACKGROUND_INDEX = 0

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC devkit colour map: bits of the index spread over the high bits of R, G and B."""
    palette = np.zeros((n, 3), dtype=np.uint8)
    for index in range(n):
        r = g = b = 0
        value = index
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        palette[index] = (r, g, b)
    return palette


@dataclass(frozen=True)
class LabelSpace:
    """Class list with background at index 0 and 255 as the ignore value."""

    names: tuple[str, ...]
    palette: np.ndarray = field(default_factory=voc_palette, compare=False, repr=False)
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        if self.ignore_index != IGNORE_INDEX:
            raise ValueError(f"ignore_index = {self.ignore_index}; only {IGNORE_INDEX} is supported")
        if len(self.names) < 2:
            raise ValueError("a label space needs background plus at least one class")
        if len(self.names) > self.ignore_index:
            raise ValueError(f"{len(self.names)} classes do not fit below the ignore index {self.ignore_index}")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"duplicate class names in label space: {self.names}")
        palette = np.asarray(self.palette, dtype=np.uint8)
        if palette.ndim != 2 or palette.shape[1] != 3:
            raise ValueError("palette must be a list of RGB triples")
        if palette.shape[0] < 256:
            # Unlisted entries (including the ignore value) fall back to the VOC colours.
            palette = np.concatenate([palette, voc_palette()[palette.shape[0]:]])
        object.__setattr__(self, "palette", palette)

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return len(self.names)

    @property
    def foreground(self) -> tuple[str, ...]:
        return self.names[1:]

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"class {name!r} is not in the label space {list(self.names)}") from None

    def to_dict(self) -> dict:
        return {
            "names": list(self.names),
            "palette": self.palette[: self.num_classes].tolist(),
            "background_index": BACKGROUND_INDEX,
            "ignore_index": self.ignore_index,
        }

    @classmethod
    def from_dict(cls, spec: dict, source: str = "<dict>") -> LabelSpace:
        if "names" not in spec:
            raise ValueError(f"{source}: label space needs a 'names' list (background first)")
        if spec.get("background_index", BACKGROUND_INDEX) != BACKGROUND_INDEX:
            raise ValueError(f"{source}: background must be class 0")
        if int(spec.get("ignore_index", IGNORE_INDEX)) != IGNORE_INDEX:
            # Every stage writes and reads ignore as 255 (palette PNGs, seeds, losses): one value, checked here.
            raise ValueError(f"{source}: ignore_index = {spec['ignore_index']}; only {IGNORE_INDEX} is supported "
                             "(label PNGs mark ignored pixels with it)")
        palette = spec.get("palette")
        if palette is not None:
            palette = _checked_palette(palette, source)
        return cls(names=tuple(str(n) for n in spec["names"]), palette=voc_palette() if palette is None else palette)

    @classmethod
    def load(cls, path: str | Path) -> LabelSpace:
        """Read a label-space file (JSON, or YAML when PyYAML is installed)."""
        path = Path(path)
        try:
            text = path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise ValueError(f"{path}: label-space file is missing") from None
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: label-space file is not UTF-8 text (byte {err.start})") from None
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise RuntimeError(f"{path}: reading YAML label spaces needs PyYAML; use JSON instead") from None
            try:
                spec = yaml.safe_load(text)
            except yaml.YAMLError as err:
                raise ValueError(f"{path}: not valid YAML ({err})") from None
        else:
            try:
                spec = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(spec, dict):
            raise ValueError(f"{path}: a label space is a mapping with 'names' (and 'palette'), "
                             f"not a {type(spec).__name__}")
        try:
            return cls.from_dict(spec, source=str(path))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))


def _checked_palette(palette: object, source: str) -> np.ndarray:
    """A palette as uint8 (N, 3); values outside 0..255 would wrap silently, so they are refused."""
    try:
        values = np.asarray(palette)
    except ValueError:   # ragged entries
        values = np.zeros(0)
    if values.ndim != 2 or values.shape[1] != 3 or values.dtype.kind not in "iu":
        raise ValueError(f"{source}: palette must be a list of [r, g, b] triples of integers 0..255")
    bad = np.flatnonzero(((values < 0) | (values > 255)).any(axis=1))
    if bad.size:
        raise ValueError(f"{source}: palette entry {bad[0]} = {values[bad[0]].tolist()}: RGB values must be "
                         "integers 0..255")
    return values.astype(np.uint8)


VOC_LABEL_SPACE = LabelSpace(VOC_CLASSES)

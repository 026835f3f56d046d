"""Artifact names and paths inside a stage directory: one place, read by every stage and by the pipeline.

A published stage directory holds ``provenance.json``; a sharded stage adds ``index.json`` (image -> shard HDF5)
and per-image palette PNGs under ``labels/`` (or, for the seed stage, under a side folder such as
``scribble_affinity/``); evaluation stages write ``metrics.json``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data.dense import DenseMapReader
from data.io import BadInputError

PROVENANCE = "provenance.json"
SHARD_INDEX = "index.json"
METRICS = "metrics.json"
TRAINING_LOG = "log.csv"     # a trained stage's per-epoch or per-evaluation rows
LABELS = "labels"
PARTS_SUFFIX = ".parts"     # finished shards of a stage not yet joined, next to its directory
RESUME_SUFFIX = ".resume"   # training checkpoints of an unfinished stage, next to its directory


def label_file(stage_dir: str | Path, image_id: str, folder: str = LABELS) -> Path:
    """Where a per-image label map of a stage lives (ids may contain '/': sub-folders). ``folder`` names a side
    folder of extra maps (e.g. ``scribble_affinity``)."""
    return Path(stage_dir) / folder / f"{image_id}.png"


def read_cam(cams: DenseMapReader, image_id: str, name: str, size: tuple[int, int]) -> tuple[np.ndarray, list[int]]:
    """One image's CAM planes and their class keys, checked against the image size."""
    arrays, attrs = cams.read(image_id, [name])
    cam, keys = arrays[name], [int(k) for k in attrs["keys"]]
    if name == "high_res" and cam.shape[1:] != tuple(size):
        raise BadInputError(cams.index[image_id], f"CAM of image {image_id!r} is {cam.shape[1:]}, image is {size}")
    if cam.shape[0] != len(keys):
        raise BadInputError(cams.index[image_id], f"image {image_id!r}: {cam.shape[0]} CAM planes, {len(keys)} keys")
    return cam, keys

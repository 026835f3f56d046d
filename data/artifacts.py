"""Artifact names and paths inside a stage directory: one place, read by every stage and by the pipeline.

A published stage directory holds ``provenance.json``; a sharded stage adds ``index.json`` (image -> shard HDF5)
and per-image palette PNGs under ``labels/`` (or, for the seed stage, under a side folder such as
``scribble_affinity/``); evaluation stages write ``metrics.json``; trained stages ``model.pt`` and ``log.csv``.
This module is a leaf: every layer may read the names.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

PROVENANCE = "provenance.json"
SHARD_INDEX = "index.json"
METRICS = "metrics.json"
TRAINING_LOG = "log.csv"     # a trained stage's per-epoch or per-evaluation rows
MODEL_WEIGHTS = "model.pt"   # a trained stage's network (state dict)
BACKBONE_WEIGHTS = "backbone.pth"   # PretrainBackbone's backbone, in the torchvision ResNet layout
RESUME_CHECKPOINT = "last.pt"       # inside <key>.resume/: the training engine's checkpoint
LABELS = "labels"
RAW_PREDICTIONS = "raw"   # EvalSegmentation: predictions before the CRF
SCRIBBLE_AFFINITY = "scribble_affinity"   # ExtractSeeds with scribbles: CAM seeds + scribbles (the affinity net's)
SCRIBBLE_GROWN = "scribble_grown"         # ... and the scribbles grown over superpixels (the GNN's)
PARTS_SUFFIX = ".parts"     # finished shards of a stage not yet joined, next to its directory
RESUME_SUFFIX = ".resume"   # training checkpoints of an unfinished stage, next to its directory
INPUTS_RECORD = "inputs.json"   # in <key>.parts/ and <key>.resume/: the stage directories that work reads (for gc)


class UnsafeImageIdError(ValueError):
    """An image id that would build a path outside the folder it is meant for."""


def image_id_problem(image_id: str) -> str | None:
    """Why ``image_id`` cannot name files (None when it can).

    An id is a relative path in one spelling only: '/'-separated parts, none empty, ``.`` or ``..``; no absolute
    path, backslash, control or format character (a byte-order mark) and no surrounding whitespace. Every path
    built from an id then stays under the folder it is joined to (as long as no part is a symlink).
    """
    if not image_id:
        return "the id is empty"
    if image_id != image_id.strip():
        return "the id starts or ends with whitespace"
    if "\\" in image_id:
        return "the id contains a backslash (use '/' for sub-folders)"
    bad = next((c for c in image_id if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")), None)
    if bad is not None:
        return f"the id contains the control or format character U+{ord(bad):04X}"
    if image_id.startswith("/") or os.path.isabs(image_id):
        return "the id is an absolute path"
    part = next((p for p in image_id.split("/") if p in ("", ".", "..")), None)
    if part is not None:
        return f"the id has {repr(part) if part else 'an empty'} part (write each id in one normalised spelling)"
    return None


def label_file(stage_dir: str | Path, image_id: str, folder: str = LABELS, ext: str = ".png") -> Path:
    """Where a per-image file of a stage lives: ``<stage_dir>/<folder>/<id><ext>`` (ids may contain '/':
    sub-folders). ``folder`` names a side folder of extra maps (e.g. ``scribble_affinity``).

    Every per-image reader and writer builds its path here, so the id is checked once for all of them: an id
    that could leave ``<stage_dir>/<folder>`` (a ``..`` part, an absolute path, a symlinked folder on the way out)
    raises :class:`UnsafeImageIdError` instead of reading or writing elsewhere.
    """
    problem = image_id_problem(image_id)
    if problem is not None:
        raise UnsafeImageIdError(f"image id {image_id!r}: {problem}; refusing to build a path from it")
    base = Path(stage_dir) / folder
    path = base / f"{image_id}{ext}"
    if not path.resolve().is_relative_to(base.resolve()):
        raise UnsafeImageIdError(f"image id {image_id!r}: {path} resolves outside {base}")
    return path

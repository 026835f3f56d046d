"""Artifact names and paths inside a stage directory: one place, read by every stage and by the pipeline.

A published stage directory holds ``provenance.json``; a sharded stage adds ``index.json`` (image -> shard HDF5)
and per-image palette PNGs under ``labels/`` (or, for the seed stage, under a side folder such as
``scribble_affinity/``); evaluation stages write ``metrics.json``; trained stages ``model.pt`` and ``log.csv``.
This module is a leaf: every layer may read the names.
"""

from __future__ import annotations

from pathlib import Path

PROVENANCE = "provenance.json"
SHARD_INDEX = "index.json"
METRICS = "metrics.json"
TRAINING_LOG = "log.csv"     # a trained stage's per-epoch or per-evaluation rows
MODEL_WEIGHTS = "model.pt"   # a trained stage's network (state dict)
BACKBONE_WEIGHTS = "backbone.pth"   # PretrainBackbone's backbone, in the torchvision ResNet layout
RESUME_CHECKPOINT = "last.pt"       # inside <key>.resume/: the training engine's checkpoint
LABELS = "labels"
SCRIBBLE_AFFINITY = "scribble_affinity"   # ExtractSeeds with scribbles: CAM seeds + scribbles (the affinity net's)
SCRIBBLE_GROWN = "scribble_grown"         # ... and the scribbles grown over superpixels (the GNN's)
PARTS_SUFFIX = ".parts"     # finished shards of a stage not yet joined, next to its directory
RESUME_SUFFIX = ".resume"   # training checkpoints of an unfinished stage, next to its directory


def label_file(stage_dir: str | Path, image_id: str, folder: str = LABELS) -> Path:
    """Where a per-image label map of a stage lives (ids may contain '/': sub-folders). ``folder`` names a side
    folder of extra maps (e.g. ``scribble_affinity``)."""
    return Path(stage_dir) / folder / f"{image_id}.png"

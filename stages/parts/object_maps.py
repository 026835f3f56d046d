"""MakeObjectMaps: the per-image object softmax GMNet is conditioned on, for train and val.

Sources: ``gt`` (one-hot of the object label map, 255 pixels uniform), ``supervised`` (a DeepLab trained on
GT objects: GMNet's choice, whose train-split maps are over-confident because it saw those images),
``wsss`` (the weakly supervised chain's DeepLab: what the pipeline adds), ``none`` (uniform maps: the same
network with no object information). Maps are float16 ``probs`` (O, H, W) in the stage's HDF5 shards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from data.dense import DenseMapReader, DenseMapWriter
from data.io import BadInputError
from data.manifest import Manifest
from stages.parts.train import gt_object_maps
from stages.segmentation.model import predict_probs

MAPS = "probs"


def make_object_maps(source: str, model: torch.nn.Module | None, manifest: Manifest, ids: Sequence[str],
                     writer: DenseMapWriter, device: torch.device, scales: Sequence[float] = (1.0,),
                     flip: bool = True, progress: Callable[[float, str], None] | None = None) -> None:
    num_objects = manifest.label_space.num_classes
    val = set(manifest.splits["val"])
    for n, image_id in enumerate(ids):
        if source == "gt":
            maps = gt_object_maps(manifest.layout.read_label(image_id, evaluation=image_id in val), num_objects)
        elif source == "none":
            h, w = manifest.layout.read_image(image_id).shape[:2]
            maps = np.full((num_objects, h, w), 1.0 / num_objects, np.float32)
        else:
            if model is None:
                raise ValueError(f"MakeObjectMaps.source = {source} needs the object segmenter")
            maps = predict_probs(model, manifest.layout.read_image(image_id), device, scales, flip)
        writer.write(image_id, {MAPS: maps})
        if progress:
            progress(100 * (n + 1) / len(ids), f"{n + 1}/{len(ids)} images")


def object_map_source(reader: DenseMapReader, num_objects: int) -> Callable[[str], np.ndarray]:
    """image id -> its (O, H, W) float32 maps, checked to have one plane per object class."""
    def read(image_id: str) -> np.ndarray:
        maps = reader.read(image_id, [MAPS])[0][MAPS]
        if maps.shape[0] != num_objects:
            raise BadInputError(reader.index[image_id], f"image {image_id!r}: {maps.shape[0]} object maps, the "
                                                        f"object label space has {num_objects} classes")
        return maps
    return read

"""Run a seed rule over images: full-resolution CAMs in, palette seed PNGs (and CRF score maps) out."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from data.dense import DenseMapReader, DenseMapWriter
from data.io import BadInputError, write_label_png
from data.manifest import Manifest
from stages.config import ExtractSeedsConfig
from stages.seeds import SEED_METHODS, validate_seed_config
from stages.supervision import extra_label_file, merge_supervision, validate_supervision_config

LABELS = "labels"


def label_file(stage_dir: str | Path, image_id: str) -> Path:
    """Where a per-image label map of a stage lives (ids may contain '/': sub-folders)."""
    return Path(stage_dir) / LABELS / f"{image_id}.png"


def read_cam(cams: DenseMapReader, image_id: str, name: str, size: tuple[int, int]) -> tuple[np.ndarray, list[int]]:
    """One image's CAM planes and their class keys, checked against the image size."""
    arrays, attrs = cams.read(image_id, [name])
    cam, keys = arrays[name], [int(k) for k in attrs["keys"]]
    if name == "high_res" and cam.shape[1:] != tuple(size):
        raise BadInputError(cams.index[image_id], f"CAM of image {image_id!r} is {cam.shape[1:]}, image is {size}")
    if cam.shape[0] != len(keys):
        raise BadInputError(cams.index[image_id], f"image {image_id!r}: {cam.shape[0]} CAM planes, {len(keys)} keys")
    return cam, keys


def extract_seeds(cfg: ExtractSeedsConfig, manifest: Manifest, ids: Sequence[str], cams: DenseMapReader,
                  out_dir: Path, writer: DenseMapWriter,
                  progress: Callable[[float, str], None] | None = None) -> dict:
    """Seeds of ``ids`` as ``labels/<id>.png`` under ``out_dir``; CRF score maps (if any) through ``writer``."""
    validate_seed_config(cfg)
    validate_supervision_config(cfg)
    rule = SEED_METHODS.get(cfg.seed_method)
    layout, palette = manifest.layout, manifest.label_space.palette
    empty = []
    for n, image_id in enumerate(ids, start=1):
        rgb = layout.read_image(image_id)
        cam, keys = read_cam(cams, image_id, "high_res", rgb.shape[:2])
        try:
            seeds = rule(rgb, cam, keys, cfg)
            # points / scribbles / boxes on top of the CAM seeds (a no-op for supervision = image)
            merged = merge_supervision(cfg, layout, image_id, rgb, cam, keys, seeds.label)
        except BadInputError:  # already names the annotation file
            raise
        except ValueError as err:  # the rules check shapes and ranges but do not know the image
            raise ValueError(f"ExtractSeeds, image {image_id!r}: {err}") from err
        seeds.label = merged.label
        path = label_file(out_dir, image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_label_png(path, seeds.label, palette)
        for name, extra in merged.extra.items():
            extra_path = extra_label_file(out_dir, name, image_id)
            extra_path.parent.mkdir(parents=True, exist_ok=True)
            write_label_png(extra_path, extra, palette)
        if seeds.scores:
            writer.write(image_id, seeds.scores, {"keys": np.asarray(keys, np.int32)})
        if np.all(seeds.label == 255):
            empty.append(image_id)
        if progress and (n % 20 == 0 or n == len(ids)):
            progress(100.0 * n / len(ids), f"{n}/{len(ids)} images")
    return {"empty_seed_images": empty}

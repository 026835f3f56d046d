"""Run a seed rule over images: full-resolution CAMs in, palette seed PNGs (and CRF score maps) out."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from data.artifacts import label_file
from data.dense import DenseMapReader, DenseMapWriter, read_cam
from data.io import BadInputError, write_label_png
from data.manifest import Manifest
from stages.config import ExtractSeedsConfig
from stages.seeds import SUPERVISION_MODULES
from stages.seeds.rules import SEED_METHODS, validate_seed_config


def supervision_merger(cfg: ExtractSeedsConfig) -> Callable | None:
    """``merge(cfg, layout, image_id, rgb, cam, keys, seed label) -> (label, {side folder: label map})`` for the
    configured extra supervision, or None for image labels (its module is then not imported)."""
    if cfg.supervision == "image":
        return None
    module = SUPERVISION_MODULES.get(cfg.supervision, key="ExtractSeeds.supervision")
    module.validate_supervision_config(cfg)

    def merge(*args) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        merged = module.merge_supervision(*args)
        return merged.label, merged.extra
    return merge


def extract_seeds(cfg: ExtractSeedsConfig, manifest: Manifest, ids: Sequence[str], cams: DenseMapReader,
                  out_dir: Path, writer: DenseMapWriter,
                  progress: Callable[[float, str], None] | None = None) -> dict:
    """Seeds of ``ids`` as ``labels/<id>.png`` under ``out_dir``; CRF score maps (if any) through ``writer``."""
    validate_seed_config(cfg)
    merge = supervision_merger(cfg)
    rule = SEED_METHODS.get(cfg.seed_method)
    layout, palette = manifest.layout, manifest.label_space.palette
    empty = []
    for n, image_id in enumerate(ids, start=1):
        rgb = layout.read_image(image_id)
        cam, keys = read_cam(cams, image_id, "high_res", rgb.shape[:2])
        try:
            seeds = rule(rgb, cam, keys, cfg)
            # points / scribbles / boxes on top of the CAM seeds
            label, extras = merge(cfg, layout, image_id, rgb, cam, keys, seeds.label) if merge else (seeds.label, {})
        except BadInputError:  # already names the annotation file
            raise
        except ValueError as err:  # the rules check shapes and ranges but do not know the image
            raise ValueError(f"ExtractSeeds, image {image_id!r}: {err}") from err
        seeds.label = label
        path = label_file(out_dir, image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_label_png(path, seeds.label, palette)
        for name, extra in extras.items():
            extra_path = label_file(out_dir, image_id, folder=name)
            extra_path.parent.mkdir(parents=True, exist_ok=True)
            write_label_png(extra_path, extra, palette)
        if seeds.scores:
            writer.write(image_id, seeds.scores, {"keys": np.asarray(keys, np.int32)})
        if np.all(seeds.label == 255):
            empty.append(image_id)
        if progress and (n % 20 == 0 or n == len(ids)):
            progress(100.0 * n / len(ids), f"{n}/{len(ids)} images")
    return {"empty_seed_images": empty}

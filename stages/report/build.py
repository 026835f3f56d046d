"""Gather a finished run's artifacts into ``stages.report.html.ReportInputs`` and render the report.

The gallery shows the first ``gallery_images`` eval images through every stage: image, CAM (max over the
image's classes), seeds, pseudo label, after the CRF, the retrained DeepLab's prediction (scales, flip and
CRF of EvalSegmentation) and GT. With part runs (``Report.parts_compare``) a parts gallery shows the first
``gallery_images`` val images: image, part GT, and per conditioning source its object maps and part prediction.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from data.artifacts import TRAINING_LOG, label_file
from data.io import read_json, read_label_png
from data.manifest import Manifest
from data.parts import PartLayout
from stages.config import EvalSegmentationConfig, ReportConfig, TrainSegmentationConfig, validate
from stages.report.cooccurrence import measure_cooccurrence
from stages.report.html import CEILING_RUN, DEEPLAB_RUN

# The two DeepLab runs by what they learn from; every other trained stage by its stage name.
TRAINING_RUN_NAMES = {"TrainSegmentation": DEEPLAB_RUN, "TrainSegmentation-gt": CEILING_RUN}


def dataset_name(dataset: dict, manifest: Manifest) -> str:
    """What the report's title calls the data: the synthetic profile, or a VOC-layout root's folder name."""
    if dataset.get("kind", "synthetic") == "synthetic":
        return f"synthetic {dataset.get('profile', 'demo')}"
    return Path(str(dataset.get("root") or manifest.root)).name or str(manifest.root)


def final_labels_dir(dirs: dict[str, Path], segmenter_config: TrainSegmentationConfig) -> Path:
    """The stage directory of the pseudo labels DeepLab trained on: RefineCRF's (also under ``agreed``, which
    ignores the pixels the CRF changed), or Propagate's with ``pseudo_labels = propagated``."""
    return dirs["labels"] if segmenter_config.pseudo_labels == "propagated" else dirs["refined"]


def read_curve(path: Path) -> list[dict]:
    """A CSV of numbers as dicts of floats (empty cells become None)."""
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [{k: (float(v) if v not in ("", "None") else None) for k, v in row.items()}
                for row in csv.DictReader(fh)]


def gallery_panels(manifest: Manifest, dirs: dict[str, Path], image_ids: list[str], model: torch.nn.Module | None,
                   eval_cfg: EvalSegmentationConfig, device: torch.device) -> list[tuple[str, dict[str, np.ndarray]]]:
    from data.dense import stage_maps
    from stages.segmentation.predict import predict_labels

    space = manifest.label_space
    cams = stage_maps(dirs["cams"])
    rows = []
    for image_id in image_ids:
        rgb = manifest.layout.read_image(image_id)
        panels: dict[str, np.ndarray] = {"image": rgb}
        if image_id in cams:
            high = cams.read(image_id, ["high_res"])[0]["high_res"]
            panels["cam"] = high.max(0).astype(np.float32) if len(high) else np.zeros(rgb.shape[:2], np.float32)
        for panel, stage in (("seeds", "seeds"), ("pseudo", "labels"), ("crf", "refined")):
            path = label_file(dirs[stage], image_id)
            if path.is_file():
                panels[panel] = read_label_png(path, space)
        if model is not None:
            panels["prediction"] = predict_labels(model, rgb, eval_cfg, device)[1]
        panels["gt"] = manifest.layout.read_label(image_id, evaluation=True)
        rows.append((image_id, panels))
    return rows


def object_map_labels(probs: np.ndarray) -> np.ndarray:
    """The argmax of (O, H, W) object maps; 255 where they are uniform (no object information)."""
    labels = probs.argmax(0).astype(np.uint8)
    labels[probs.max(0) <= 1.0 / len(probs) + 1e-3] = 255
    return labels


def parts_gallery(manifest: Manifest, layout: PartLayout, runs: list[dict], image_ids: list[str]
                  ) -> list[tuple[str, list]]:
    """Per val image: the image, the part GT, then for each conditioning source's first run its object maps
    (none has no maps) and its part prediction (EvalParts' palette PNG)."""
    from data.dense import stage_maps

    shown: dict[str, dict] = {}
    for run in runs:
        shown.setdefault(run["cond_source"], run)
    maps = {source: stage_maps(run["maps_dir"]) for source, run in shown.items() if run.get("maps_dir")}
    gallery = []
    for image_id in image_ids:
        rgb = manifest.layout.read_image(image_id)
        panels = [("image", "image", rgb), ("part GT", "parts", layout.read_parts(image_id, rgb.shape[:2]))]
        for source, run in shown.items():
            if source in maps:
                probs = maps[source].read(image_id, ["probs"])[0]["probs"]
                panels.append((f"objects ({source})", "objects", object_map_labels(probs)))
            panels.append((f"parts: {run['entry']}", "parts",
                           read_label_png(label_file(run["eval_dir"], image_id), layout.space.parts)))
        gallery.append((image_id, panels))
    return gallery


def parts_inputs(manifest: Manifest, layout: PartLayout, runs: list[dict], gallery_images: int):
    """The report's parts section from ``Report.part_comparison()``'s rows, all in ``layout``'s part space."""
    from stages.report.html import PartsInputs

    space = layout.space
    shown = [{k: run[k] for k in ("entry", "cond_source", "gm_mode", "gm_lambda", "train_seconds", "metrics")}
             for run in runs]
    return PartsInputs(part_names=list(space.parts.names), part_palette=space.parts.palette,
                       object_names=list(space.objects.names), object_palette=space.objects.palette, runs=shown,
                       gallery=parts_gallery(manifest, layout, runs, manifest.splits["val"][:gallery_images]))


def build_report(cfg: ReportConfig, manifest: Manifest, dirs: dict[str, Path], config: dict[str, dict],
                 provenance: dict[str, dict], segmenter_config: TrainSegmentationConfig,
                 eval_config: EvalSegmentationConfig, device: torch.device, out_dir: Path,
                 comparison: list[dict] | None = None, parts: list[dict] | None = None,
                 part_layout: PartLayout | None = None,
                 segmenters: list[dict] | None = None, trained: dict[str, Path] | None = None) -> dict:
    """``report.html`` and ``report.md`` in ``out_dir`` from the stage directories ``dirs``; ``parts``: the
    part runs compared (``Report.part_comparison()``) in ``part_layout``'s part space; none = no parts section;
    ``trained``: every trained stage's directory by stage name (its ``log.csv`` is drawn; default: the two
    DeepLab runs)."""
    from stages.report.html import ReportInputs, write_report
    from stages.segmentation.model import load_segmenter

    validate(cfg)

    def metrics(name: str) -> dict | None:
        path = dirs[name] / "metrics.json"
        return read_json(path) if path.is_file() else None

    pseudo = metrics("pseudo_eval") or {}
    refined = None
    if pseudo.get("refined_per_class_iou") is not None:
        refined = {"miou": pseudo["chain"]["refined_miou"], "per_class_iou": pseudo["refined_per_class_iou"]}
    model = load_segmenter(segmenter_config, manifest.label_space.num_classes, dirs["segmenter"], device)
    ids = manifest.splits["eval"][:cfg.gallery_images]
    notes = [f"quarantined image {q.get('id')}: {q.get('problem')}" for q in manifest.quarantine]
    if pseudo.get("cam_fallback_images"):
        notes.append(f"{pseudo['cam_fallback_images']} eval images had no seeds and were labelled from their CAM")
    trained = trained or {"TrainSegmentation": dirs["segmenter"], "TrainSegmentation-gt": dirs["ceiling_segmenter"]}
    inputs = ReportInputs(
        title=f"wsss run: {dataset_name(config.get('PrepareDataset', {}), manifest)}",
        class_names=list(manifest.label_space.names), palette=manifest.label_space.palette,
        config=config, provenance=provenance,
        cam_metrics=metrics("cam_eval") or {}, cam_curve=read_curve(dirs["cam_eval"] / "curve.csv"),
        pseudo_metrics=pseudo, refined_metrics=refined,
        segmentation_metrics=metrics("segmentation"), ceiling_metrics=metrics("ceiling"),
        training_curves={TRAINING_RUN_NAMES.get(name, name): read_curve(d / TRAINING_LOG)
                         for name, d in trained.items()},
        gallery=gallery_panels(manifest, dirs, ids, model, eval_config, device), notes=notes,
        comparison=comparison or [], segmenters=segmenters or [],
        cooccurrence=measure_cooccurrence(manifest, final_labels_dir(dirs, segmenter_config), cfg.cooccurrence_flag,
                                          dirs.get("segmentation")),
        parts=parts_inputs(manifest, part_layout, parts, cfg.gallery_images) if parts else None)
    summary = write_report(inputs, out_dir)
    # Paths inside the temporary stage directory mean nothing once it is published.
    return {k: v for k, v in summary.items() if k not in ("html", "markdown", "figures")}

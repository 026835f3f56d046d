"""Score pseudo labels and the seeds they came from on the eval list; report the whole chain.

Same protocol as the CAMs (stages.metrics): one dataset-level confusion matrix, background included,
GT 255 ignored. The report lines up, per class, CAM IoU -> seed precision / recall / coverage ->
pseudo-label IoU, so a regression can be traced to the stage that caused it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from data.artifacts import label_file
from data.io import read_label_png, write_json
from data.manifest import Manifest
from stages.config import EvalPseudoLabelsConfig, validate
from stages.metrics import confusion, scores
from stages.seeds.rules import SeedQuality


def evaluate_pseudo_labels(cfg: EvalPseudoLabelsConfig, manifest: Manifest, labels_dir: Path, seeds_dir: Path,
                           upstream_metrics: dict[str, dict], out_dir: Path,
                           progress: Callable[[float, str], None] | None = None,
                           refined_dir: Path | None = None) -> dict:
    """Write metrics.json and report.md; ``upstream_metrics`` holds the CAM, seed and propagation metrics.

    ``refined_dir`` holds the same pseudo labels after the CRF (RefineCRF), scored alongside.
    """
    validate(cfg)
    space = manifest.label_space
    layout = manifest.layout
    ids = manifest.splits["eval"]
    conf = np.zeros((space.num_classes, space.num_classes), np.int64)
    conf_refined = np.zeros_like(conf)
    quality = SeedQuality(space.num_classes)
    for n, image_id in enumerate(ids, start=1):
        gt = layout.read_label(image_id, evaluation=True)
        pred = read_label_png(label_file(labels_dir, image_id), space)
        conf += confusion(gt, pred, space.num_classes, space.ignore_index, cfg.pred_ignore)
        if refined_dir is not None:
            refined = read_label_png(label_file(refined_dir, image_id), space)
            conf_refined += confusion(gt, refined, space.num_classes, space.ignore_index, cfg.pred_ignore)
        quality.add(read_label_png(label_file(seeds_dir, image_id), space), gt)
        if progress and (n % 50 == 0 or n == len(ids)):
            progress(100.0 * n / len(ids), f"scored {n}/{len(ids)} images")
    result = scores(conf)
    refined_result = scores(conf_refined) if refined_dir is not None else None
    seeds = quality.summary(space.names)
    cam = upstream_metrics.get("cam", {})
    fallback = upstream_metrics.get("propagate", {}).get("cam_fallback_images", [])
    metrics = {
        "miou": result["miou"], "per_class_iou": dict(zip(space.names, result["iou"])),
        "pixel_accuracy": result["pixel_accuracy"], "fp_fg": result["fp_fg"], "fn_fg": result["fn_fg"],
        "n_images": len(ids), "pred_ignore": cfg.pred_ignore,
        "chain": {"cam_miou": cam.get("miou"), "cam_threshold": cam.get("threshold"),
                  "seed_miou": seeds.get("miou"), "seed_precision": seeds.get("precision"),
                  "seed_labelled_fraction": seeds.get("labelled_fraction"),
                  "pseudo_label_miou": result["miou"],
                  "refined_miou": refined_result["miou"] if refined_result else None},
        "refined_per_class_iou": dict(zip(space.names, refined_result["iou"])) if refined_result else None,
        "seeds": seeds,
        "cam_fallback_images": len(fallback),
        "empty_seed_images": len(upstream_metrics.get("seeds", {}).get("empty_seed_images", [])),
    }
    write_json(out_dir / "metrics.json", metrics)
    write_report(out_dir / "report.md", metrics, cam.get("per_class_iou", {}), space.names)
    return {k: metrics[k] for k in ("miou", "n_images", "cam_fallback_images", "empty_seed_images")} | {
        "chain": metrics["chain"]}


def _pct(value: object) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{100 * value:.1f}"


def write_report(path: Path, metrics: dict, cam_iou: dict, names: list[str]) -> None:
    chain = metrics["chain"]
    per_class = metrics["seeds"].get("classes", {})
    lines = [
        "# CAM -> seeds -> pseudo labels",
        "",
        f"Eval images: {metrics['n_images']}. CAM mIoU {_pct(chain['cam_miou'])} (background threshold "
        f"{chain['cam_threshold']}) -> seed mIoU on labelled pixels {_pct(chain['seed_miou'])} "
        f"({_pct(chain['seed_labelled_fraction'])}% of pixels labelled) -> pseudo-label mIoU "
        f"{_pct(chain['pseudo_label_miou'])} -> after the CRF {_pct(chain.get('refined_miou'))}.",
        f"Images whose seeds were all ignore: {metrics['empty_seed_images']}; labelled from the CAM alone: "
        f"{metrics['cam_fallback_images']}.",
        "",
        "| class | CAM IoU | seed precision | seed recall | seed coverage | pseudo-label IoU | after CRF |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        seed = per_class.get(name, {})
        lines.append(f"| {name} | {_pct(cam_iou.get(name))} | {_pct(seed.get('precision'))} | "
                     f"{_pct(seed.get('recall'))} | {_pct(seed.get('coverage'))} | "
                     f"{_pct(metrics['per_class_iou'].get(name))} | "
                     f"{_pct((metrics.get('refined_per_class_iou') or {}).get(name))} |")
    path.write_text("\n".join(lines) + "\n")

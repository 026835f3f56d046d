"""The run report: one self-contained HTML page and a Markdown summary of a whole WSSS run.

Written for a paper's appendix: every figure is a PNG inlined as a base64 ``data:`` URI (also kept under
``figures/``), the CSS is inline, and nothing refers to the network, so the page opens anywhere, offline,
forever. Metrics arrive in the stages' own formats (fractions in [0, 1], NaN for a class absent from both
GT and prediction) and are shown as percentages with one decimal; NaN and missing values show as "-".

Figures are drawn on matplotlib ``Figure`` objects rendered by Agg directly, without pyplot, so making a
report neither changes nor depends on the process's global backend. Apart from the date in the header
(``ReportInputs.generated`` pins it), the same inputs give byte-identical files.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from data.io import atomic_path
from stages.report.colours import SERIES_COLOURS, figure_palette
from stages.report.cooccurrence import SCENE_CONTEXT, Cooccurrence

HTML_NAME = "report.html"
MARKDOWN_NAME = "report.md"
FIGURES_DIR = "figures"

# Gallery columns, in display order, with their headers.
PANEL_TITLES = {
    "image": "Image", "cam": "CAM", "seeds": "Seeds", "pseudo": "Pseudo labels", "crf": "After CRF",
    "prediction": "DeepLab (train image)", "gt": "Ground truth",
}
LABEL_PANELS = ("seeds", "pseudo", "crf", "prediction", "gt")

DEEPLAB_RUN, CEILING_RUN = "DeepLab on pseudo labels", "DeepLab on GT (ceiling)"   # their training curves' names

SECTIONS = (
    ("headline", "Headline results"), ("methods", "Propagation methods compared"),
    ("parts", "Part segmentation (GMNet)"),
    ("segmenters", "Segmenters compared"),
    ("per-class", "Per-class IoU"), ("cooccurrence", "Co-occurrence"), ("cam-curve", "CAM threshold curve"),
    ("training", "Training curves"), ("gallery", "Gallery"), ("configuration", "Configuration"),
    ("provenance", "Provenance"), ("notes", "Notes"),
)

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
h3 { font-size: 1.05em; }
.meta { color: #555; font-size: 0.92em; }
nav a { margin-right: 0.8em; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
tr:nth-child(even) td { background: #fafafa; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.mean td { font-weight: bold; border-top: 2px solid #bbb; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.88em; }
details { margin: 0.4em 0; }
summary { cursor: pointer; font-weight: 600; overflow-wrap: anywhere; }
.wide { overflow-x: auto; }
code { font-size: 0.92em; }
.not-run { color: #8a6d3b; font-style: italic; }
tr.flagged td { background: #fde2e1; }
.flag { color: #a61b1b; font-weight: 600; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; border: 1px solid #999; vertical-align: middle;
          margin: 0 0.25em 0 0.8em; }
"""


@dataclass
class ReportInputs:
    """Everything the report shows; metrics in the stages' formats (fractions, NaN = class absent)."""

    title: str
    class_names: list[str]                 # background first
    palette: np.ndarray                    # (256, 3) uint8; 255 = ignore colour
    config: dict[str, dict]                # section -> {knob: value}, every stage in the run
    provenance: dict[str, dict]            # stage name -> its provenance.json
    cam_metrics: dict                      # EvalCAM metrics.json
    cam_curve: list[dict]                  # EvalCAM curve.csv rows: threshold, miou (+ other columns)
    pseudo_metrics: dict                   # EvalPseudoLabels metrics.json (chain, seeds)
    refined_metrics: dict | None           # pseudo labels after the CRF
    segmentation_metrics: dict | None      # DeepLab on val
    ceiling_metrics: dict | None           # DeepLab trained on GT (fully supervised ceiling)
    training_curves: dict[str, list[dict]]  # run name -> rows: epoch, iteration, loss, lr, val_miou, seconds
    gallery: list[tuple[str, dict[str, np.ndarray]]]  # (image id, {panel kind: array})
    notes: list[str] = field(default_factory=list)  # free-text warnings
    # Report.compare: one row per method (the main chain's first): EvalPseudoLabels' chain figures plus
    # "method", "trainer", "train_seconds", "propagate_seconds", "crf_seconds", "propagated_images"
    comparison: list[dict] = field(default_factory=list)
    parts: PartsInputs | None = None       # Report.parts_compare's runs; None = no parts section
    # Report.compare_segmenters: one row per (model, labels), the main segmenter's first: "model", "labels"
    # (pseudo | gt), "miou_no_crf", "miou_crf" (None without the CRF), "train_seconds"
    segmenters: list[dict] = field(default_factory=list)
    # per class of the final pseudo labels: its pixels on GT background, recall, top context, DeepLab's val
    # background painted as it (stages.report.cooccurrence); None = not measured (the section says "not run")
    cooccurrence: Cooccurrence | None = None
    generated: str | None = None           # the header's date; None = now


# A parts gallery panel: its column title, how to colour it ("image", "objects" or "parts") and the array.
PartPanel = tuple[str, str, np.ndarray]


@dataclass
class PartsInputs:
    """The part runs compared (``Report.parts_compare``) and what the parts section draws of them."""

    part_names: list[str]                  # background first
    part_palette: np.ndarray               # (256, 3) uint8
    object_names: list[str]
    object_palette: np.ndarray             # (256, 3) uint8
    # One per run: "entry", "cond_source", "gm_mode", "gm_lambda", "train_seconds" and "metrics", EvalParts'
    # metrics.json (fractions; "iou" per part, None = absent; adjacency error a GM value, not a fraction)
    runs: list[dict]
    gallery: list[tuple[str, list[PartPanel]]] = field(default_factory=list)  # (image id, panels in order)


# ------------------------------------------------------------------------------------------- formatting

def _as_float(value: object) -> float:
    """A metric value as a float; None, '' and unparsable text become NaN (CSV rows carry strings)."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _finite_or_none(value: object) -> float | None:
    number = _as_float(value)
    return number if math.isfinite(number) else None


def format_percent(value: object) -> str:
    """A fraction in [0, 1] as a percentage with one decimal ("63.2"); NaN / None / missing as "-"."""
    number = _as_float(value)
    return f"{100 * number:.1f}" if math.isfinite(number) else "-"


def _percent_text(value: object) -> str:
    """A percentage for running text: "83.0%", or "-" without a "%"."""
    text = format_percent(value)
    return text if text == "-" else f"{text}%"


def format_threshold(value: object) -> str:
    number = _as_float(value)
    return f"{number:.2f}" if math.isfinite(number) else "-"


def format_duration(seconds: float) -> str:
    """Seconds as "1 h 02 min 03 s", "4 min 05 s" or "12.3 s"."""
    if not math.isfinite(seconds):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours} h {minutes:02d} min {secs:02d} s" if hours else f"{minutes} min {secs:02d} s"


def format_value(value: object) -> str:
    """A configuration value as it would be written in luigi.cfg."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=isinstance(value, dict), default=str)
    return str(value)


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _md(value: object) -> str:
    """Text for Markdown: pipes and '<' backslash-escaped (CommonMark would take '<x>' for HTML), one line."""
    text = str(value).replace("\\", "\\\\").replace("|", "\\|").replace("<", "\\<")
    return text.replace("\n", " ")


def _mpl(value: object) -> str:
    """Text for matplotlib: a '$' would otherwise start mathtext."""
    return str(value).replace("$", r"\$")


# ----------------------------------------------------------------------------------------- input checks

def _check_palette(palette: object) -> np.ndarray:
    array = np.asarray(palette)
    if array.shape != (256, 3):
        raise ValueError(f"report palette must have shape (256, 3) (one RGB triple per label value), "
                         f"got {array.shape}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.number) or not np.all(np.isfinite(array)) \
                or array.min() < 0 or array.max() > 255 or not np.all(array == np.round(array)):
            raise ValueError("report palette values must be integers in 0..255")
        array = array.astype(np.uint8)
    return array


def _check_class_names(names: Sequence[str]) -> list[str]:
    names = [str(name) for name in names]
    if len(names) < 2:
        raise ValueError(f"report needs background plus at least one class name, got {names}")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate class names in the report inputs: {names}")
    return names


def _check_parts(parts: PartsInputs) -> PartsInputs:
    """The parts inputs with checked names and palettes; every run's per-part IoU list matches the part names."""
    names = _check_class_names(parts.part_names)
    for run in parts.runs:
        iou = (run.get("metrics") or {}).get("iou")
        if iou is not None and len(iou) != len(names):
            raise ValueError(f"part run {run.get('entry')!r}: {len(iou)} per-part IoU values for {len(names)} parts")
    return dataclasses.replace(parts, part_names=names, part_palette=_check_palette(parts.part_palette),
                               object_names=_check_class_names(parts.object_names),
                               object_palette=_check_palette(parts.object_palette))


# ------------------------------------------------------------------------------------------ the numbers

@dataclass
class _Stage:
    """One column of the per-class table: a stage's per-class IoU and its mIoU."""

    label: str
    miou: object
    per_class: dict[str, object]


def _seed_figures(pseudo: dict) -> dict[str, object]:
    seeds = pseudo.get("seeds") or {}
    chain = pseudo.get("chain") or {}
    return {
        "miou": seeds.get("miou", chain.get("seed_miou")),
        "precision": seeds.get("precision", chain.get("seed_precision")),
        # Seeds label a fraction of the pixels; that fraction is the seeds' recall of the image.
        "labelled_fraction": seeds.get("labelled_fraction", chain.get("seed_labelled_fraction")),
    }


def _ratio(numerator: object, denominator: object) -> float | None:
    top, bottom = _finite_or_none(numerator), _finite_or_none(denominator)
    if top is None or bottom is None or bottom <= 0:
        return None
    return top / bottom


def _seg_details(metrics: dict) -> str:
    parts = [f"pixel acc. {_percent_text(metrics.get('pixel_accuracy'))}",
             f"mean acc. {_percent_text(metrics.get('mean_accuracy'))}",
             f"fwIoU {_percent_text(metrics.get('fwiou'))}"]
    if metrics.get("n_images") is not None:
        parts.append(f"{metrics['n_images']} val images")
    if "crf" in metrics:
        parts.append("with CRF" if metrics["crf"] else "no CRF")
    return ", ".join(parts)


CONVERGED_RISE = 0.01   # final val mIoU under 1 point above the best of the first three quarters: converged


def val_rise(rows: list[dict]) -> tuple[float, float] | None:
    """(rise, share): how much the final val mIoU rose over the best one scored in the first three quarters of
    training (the best, so one noisy dip does not read as a rise), and the share of training after the last of
    those; None with fewer than two evaluations."""
    scored = [(_as_float(r.get("iteration")), _as_float(r.get("val_miou"))) for r in rows]
    scored = [(i, v) for i, v in scored if math.isfinite(i) and math.isfinite(v)]
    if len(scored) < 2:
        return None
    end, final = scored[-1]
    earlier = [(i, v) for i, v in scored[:-1] if i <= 0.75 * end] or scored[:1]
    start, before = earlier[-1][0], max(v for _, v in earlier)
    return final - before, (end - start) / end


def val_trend(rows: list[dict]) -> str:
    """``+x.x in the last y% of training: converged`` (or ``still rising``) from a training log, or ``""``."""
    rise = val_rise(rows)
    if rise is None:
        return ""
    verdict = "still rising: longer training may help" if rise[0] >= CONVERGED_RISE else "converged"
    return f"{100 * rise[0]:+.1f} in the last {100 * rise[1]:.0f}% of training: {verdict}"


def final_fit(rows: list[dict]) -> str:
    """The last training-log row's train and val mIoU (single scale): how well the net fits its own training
    labels against val, which tells an under-trained net (both low) from a hard dataset (train high); and whether
    val still rose over the last quarter of training (under-trained) or was flat (converged)."""
    last = rows[-1] if rows else {}
    train, val = _as_float(last.get("train_miou")), _as_float(last.get("val_miou"))
    if not math.isfinite(train):
        return ""
    val_text = f", val {100 * val:.1f}" if math.isfinite(val) else ""
    if trend := val_trend(rows):
        val_text += f" ({trend})"
    return f"end of training, single scale: train {100 * train:.1f} (its training labels){val_text}"


def headline_rows(inputs: ReportInputs) -> list[tuple[str, str, str]]:
    """(stage, value, details) rows of the headline table, already formatted."""
    cam = inputs.cam_metrics or {}
    pseudo = inputs.pseudo_metrics or {}
    seeds = _seed_figures(pseudo)
    n_eval = pseudo.get("n_images", cam.get("n_images"))
    eval_note = f"{n_eval} eval images" if n_eval is not None else ""
    rows = [
        (f"CAM (threshold {format_threshold(cam.get('threshold'))})", format_percent(cam.get("miou")), eval_note),
        (f"CAM (best threshold {format_threshold(cam.get('best_threshold'))})", format_percent(cam.get("best_miou")),
         "threshold tuned on GT: an upper bound, not a result"),
        ("Seeds (labelled pixels)", format_percent(seeds["miou"]),
         f"precision {_percent_text(seeds['precision'])}, "
         f"recall (labelled fraction) {_percent_text(seeds['labelled_fraction'])}"),
        ("Pseudo labels (before CRF)", format_percent(pseudo.get("miou")), eval_note),
    ]
    refined = inputs.refined_metrics
    rows.append(("Pseudo labels (after CRF)", format_percent(refined.get("miou")) if refined else "-",
                 eval_note if refined else "not run"))
    for label, metrics, run in (("DeepLab on val", inputs.segmentation_metrics, DEEPLAB_RUN),
                                ("Fully supervised ceiling", inputs.ceiling_metrics, CEILING_RUN)):
        details = _seg_details(metrics) if metrics else "not run"
        fit = final_fit(inputs.training_curves.get(run, []))
        if metrics and fit:
            details += "; " + fit
        rows.append((label, format_percent(metrics.get("miou")) if metrics else "-", details))
    ratio = _ratio((inputs.segmentation_metrics or {}).get("miou"), (inputs.ceiling_metrics or {}).get("miou"))
    if ratio is not None:
        rows.append(("DeepLab / ceiling", f"{100 * ratio:.1f}%",
                     "share of the fully supervised mIoU reached from image-level labels"))
    else:
        both_ran = bool(inputs.segmentation_metrics) and bool(inputs.ceiling_metrics)
        rows.append(("DeepLab / ceiling", "-", "undefined (a mIoU is missing or the ceiling's is 0)" if both_ran
                     else "not run"))
    return rows


COMPARISON_NOTE = ("Each method run from the same CAMs: a recipe preset runs as that preset runs it from the seeds "
                   "on (its seed rule, training, walk, final CRF and DeepLab); 'main chain's seeds' runs the method "
                   "with the main chain's recipes. Pseudo-label mIoU (%) on the eval images, DeepLab's on val; "
                   "'vs CAM' = the best of before/after CRF minus the CAM's mIoU; '/ ceiling' = DeepLab on the "
                   "method's labels over DeepLab on GT. Training = the net the method needs (affinity or "
                   "seed-trained segmenter); propagation = compute time per image summed over workers.")
COMPARISON_HEADER = ("method", "recipe", "CAM", "seeds", "pseudo labels", "after CRF", "CRF", "vs CAM",
                     "DeepLab", "/ ceiling", "training", "propagation per image", "trained net")
COMPARISON_NUMERIC = [False, False, True, True, True, True, False, True, True, True, True, True, False]


SEGMENTERS_NOTE = ("Val mIoU (%) of each segmenter trained on the run's pseudo labels and on GT (the fully supervised "
                  "ceiling), its own prediction and after the dense CRF; 'CRF gain' = the difference.")
SEGMENTERS_HEADER = ("segmenter", "trained on", "mIoU", "+ dense CRF", "CRF gain", "training")


def segmenter_rows(inputs: ReportInputs) -> list[tuple[str, ...]]:
    rows = []
    for row in inputs.segmenters:
        raw, crf = _finite_or_none(row.get("miou_no_crf")), _finite_or_none(row.get("miou_crf"))
        rows.append((str(row["model"]), "GT" if row["labels"] == "gt" else "pseudo labels", format_percent(raw),
                     format_percent(crf), f"{100 * (crf - raw):+.1f}" if raw is not None and crf is not None else "-",
                     format_duration(row["train_seconds"]) if row.get("train_seconds") is not None else "-"))
    return rows


def _trainer_text(trainer: object) -> str:
    """``TrainAffinity@seed_method=psa,...`` as ``TrainAffinity (own variant)``: the overrides are the recipe's,
    listed in the Configuration section; in the table they made it wider than any screen."""
    family, _, variant = str(trainer or "").partition("@")
    return f"{family} (own variant)" if variant else family


def comparison_rows(inputs: ReportInputs) -> list[tuple[str, ...]]:
    """The compared methods, formatted: mIoU at each step (%), the gain over the CAM, compute times."""
    rows = []
    for row in inputs.comparison:
        best = row.get("refined_miou") if row.get("refined_miou") is not None else row.get("pseudo_label_miou")
        gain = _finite_or_none(best) is not None and _finite_or_none(row.get("cam_miou")) is not None
        per_image = None
        if row.get("propagate_seconds") is not None and row.get("propagated_images"):
            per_image = row["propagate_seconds"] / row["propagated_images"]
        deeplab, ceiling = _finite_or_none(row.get("deeplab_miou")), _finite_or_none(row.get("ceiling_miou"))
        rows.append((str(row.get("method")), str(row.get("recipe", "")), format_percent(row.get("cam_miou")),
                     format_percent(row.get("seed_miou")), format_percent(row.get("pseudo_label_miou")),
                     format_percent(row.get("refined_miou")), str(row.get("crf_preset", "")),
                     f"{100 * (_as_float(best) - _as_float(row['cam_miou'])):+.1f}" if gain else "-",
                     format_percent(deeplab), f"{100 * deeplab / ceiling:.1f}%" if deeplab is not None and ceiling
                     else "-",
                     format_duration(row["train_seconds"]) if row.get("train_seconds") is not None else "-",
                     f"{1000 * per_image:.0f} ms" if per_image is not None else "-", _trainer_text(row.get("trainer"))))
    return rows


PARTS_NOTE = ("GMNet part segmenters trained with object maps from each source (none: plain DeepLab-v3+; gt: "
              "one-hot GT objects; supervised: DeepLab trained on GT objects, GMNet's choice; wsss: the weak "
              "chain's DeepLab) and the graph-matching loss off or on (st: the released value with the softmax "
              "gradient; hard: the released loss, no gradient), scored on val as GMNet's eval.py: one confusion "
              "matrix, background counted, absent parts left out of the mean (%). 'Identifiable': without the parts "
              "the image cannot tell apart (EvalParts.unidentifiable). Object mean part IoU: per object (background "
              "its own), the mean IoU of its parts with absent parts as 0 (the reference), then as left out. Object "
              "mIoU: the prediction collapsed to objects. Adjacency error: the released GM value on val as one "
              "batch (lower is better), and its mean per image; cross-object adjacency: the share of the "
              "prediction's part adjacency between parts of different objects.")
PARTS_HEADER = ("run", "objects", "GM", "λ", "part mIoU", "without bg", "identifiable", "object mean part IoU",
                "absent left out", "object mIoU", "adjacency error", "per image", "cross-object adjacency",
                "training")
PARTS_NUMERIC = [False, False, False] + [True] * 11


def _gm_text(value: object) -> str:
    number = _finite_or_none(value)
    return "-" if number is None else f"{number:.4f}"


def parts_rows(parts: PartsInputs) -> list[tuple[str, ...]]:
    """One row per part run: its conditioning, GM mode and λ (- when GM is off), then its val metrics."""
    rows = []
    for run in parts.runs:
        m = run.get("metrics") or {}
        gm_off = run.get("gm_mode") == "off" or _finite_or_none(run.get("gm_lambda")) is None
        rows.append((str(run.get("entry")), str(run.get("cond_source")), str(run.get("gm_mode")),
                     "-" if gm_off else f"{_as_float(run['gm_lambda']):g}",
                     *(format_percent(m.get(k)) for k in ("miou", "miou_no_bg", "miou_identifiable",
                                                          "object_mean_part_iou_zero", "object_mean_part_iou_present",
                                                          "object_miou")),
                     _gm_text(m.get("adjacency_error")), _gm_text(m.get("adjacency_error_per_image")),
                     format_percent(m.get("cross_object_adjacency")),
                     format_duration(run["train_seconds"]) if run.get("train_seconds") is not None else "-"))
    return rows


def _part_iou(run: dict, n_parts: int) -> list[float]:
    iou = (run.get("metrics") or {}).get("iou")
    return [_as_float(v) for v in iou] if iou is not None else [math.nan] * n_parts


def part_iou_rows(parts: PartsInputs) -> tuple[list[str], list[list[str]]]:
    """Per-part IoU (%), one column per run, and the part mIoU as the last row."""
    header = ["part", *(str(run.get("entry")) for run in parts.runs)]
    columns = [_part_iou(run, len(parts.part_names)) for run in parts.runs]
    rows = [[name, *(format_percent(column[i]) for column in columns)] for i, name in enumerate(parts.part_names)]
    rows.append(["mean (part mIoU)", *(format_percent((run.get("metrics") or {}).get("miou")) for run in parts.runs)])
    return header, rows


COOCCURRENCE_EXPLANATION = "this class learned its context: WSSS's boat/water failure"
COOCCURRENCE_NOT_RUN = "Not run: the final pseudo labels were not given."


def cooccurrence_header(cooc: Cooccurrence) -> tuple[str, ...]:
    context = ("top background scene (share)" if cooc.context_kind == SCENE_CONTEXT
               else "top co-occurring GT class (share)")
    return ("class", "pseudo-label pixels on GT background (%)", "recall (%)", context,
            "DeepLab: val background painted as the class (%)", "flagged")


COOCCURRENCE_NUMERIC = [False, True, True, False, True, False]


def cooccurrence_rows(cooc: Cooccurrence) -> list[tuple[str, ...]]:
    """One row per foreground class, formatted; '-' where a share is undefined or was not measured."""
    return [(row.name, format_percent(row.on_background), format_percent(row.recall),
             f"{row.context} ({_percent_text(row.context_share)})" if row.context is not None else "-",
             format_percent(row.val_background_painted), "yes" if row.flagged else "")
            for row in cooc.classes]


def cooccurrence_note(cooc: Cooccurrence) -> str:
    context = ("the scene of the image (Annotations/<id>.xml <scene>) holding most of the class's pixels on GT "
               "background, and its share of them" if cooc.context_kind == SCENE_CONTEXT else
               "no scene is annotated: the GT class most often present in the images where the class spills onto "
               "background, and the share of the spilled pixels in images that contain it")
    val = (f"DeepLab: the share of val GT-background pixels its prediction labels as the class "
           f"({cooc.val_images} val images)" if cooc.val_images else "DeepLab's val predictions were not read")
    return (f"Per class of the pseudo labels DeepLab trained on, on the {cooc.images} eval images (GT 255 ignored): "
            f"the share of its pixels that GT calls background, its recall (share of its GT pixels labelled as it) "
            f"and its top background context: {context}. {val}. A class is flagged when its background share "
            f"reaches {_percent_text(cooc.threshold)} ([Report] cooccurrence_flag): {COOCCURRENCE_EXPLANATION}.")


def cooccurrence_flag_line(cooc: Cooccurrence) -> str:
    """One line naming the flagged classes with their background share and top context."""
    if not cooc.flagged:
        return (f"Co-occurrence flag: no class has {_percent_text(cooc.threshold)} or more of its pseudo-label "
                "pixels on GT background.")
    shown = []
    for row in cooc.classes:
        if row.flagged:
            context = f", mostly {row.context}" if row.context is not None else ""
            shown.append(f"{row.name} ({_percent_text(row.on_background)} on GT background{context})")
    return f"Co-occurrence flag: {'; '.join(shown)}: {COOCCURRENCE_EXPLANATION}."


# Seeds label a fraction of the pixels and are scored on those alone: higher than any full labelling, not better.
SEEDS_LABEL = "Seeds (labelled pixels only)"


def per_class_stages(inputs: ReportInputs, names: Sequence[str]) -> list[_Stage]:
    """The stages with per-class IoU, in pipeline order (absent stages left out)."""
    cam = inputs.cam_metrics or {}
    pseudo = inputs.pseudo_metrics or {}
    stages = []
    if cam.get("per_class_iou"):
        stages.append(_Stage(f"CAM ({format_threshold(cam.get('threshold'))})", cam.get("miou"),
                             cam["per_class_iou"]))
    seeds = pseudo.get("seeds") or {}
    seed_iou = seeds.get("iou")
    if isinstance(seed_iou, (list, tuple)) and len(seed_iou) == len(names):
        stages.append(_Stage(SEEDS_LABEL, seeds.get("miou"), dict(zip(names, seed_iou))))
    if pseudo.get("per_class_iou"):
        stages.append(_Stage("Pseudo labels", pseudo.get("miou"), pseudo["per_class_iou"]))
    for label, metrics in (("After CRF", inputs.refined_metrics), ("DeepLab (val)", inputs.segmentation_metrics),
                           ("Ceiling (val)", inputs.ceiling_metrics)):
        if metrics and metrics.get("per_class_iou"):
            stages.append(_Stage(label, metrics.get("miou"), metrics["per_class_iou"]))
    return stages


def _summary(inputs: ReportInputs, compute_seconds: float, not_run: list[str]) -> dict:
    cam = inputs.cam_metrics or {}
    pseudo = inputs.pseudo_metrics or {}
    seeds = _seed_figures(pseudo)
    seg, ceiling = inputs.segmentation_metrics or {}, inputs.ceiling_metrics or {}
    return {
        "title": inputs.title,
        "cam_miou": _finite_or_none(cam.get("miou")), "cam_threshold": _finite_or_none(cam.get("threshold")),
        "cam_best_miou": _finite_or_none(cam.get("best_miou")),
        "cam_best_threshold": _finite_or_none(cam.get("best_threshold")),
        "seed_miou": _finite_or_none(seeds["miou"]), "seed_precision": _finite_or_none(seeds["precision"]),
        "seed_labelled_fraction": _finite_or_none(seeds["labelled_fraction"]),
        "pseudo_miou": _finite_or_none(pseudo.get("miou")),
        "refined_miou": _finite_or_none((inputs.refined_metrics or {}).get("miou")),
        "segmentation_miou": _finite_or_none(seg.get("miou")),
        "ceiling_miou": _finite_or_none(ceiling.get("miou")),
        "segmentation_to_ceiling": _ratio(seg.get("miou"), ceiling.get("miou")),  # a fraction, not %
        "compute_seconds": compute_seconds,
        "not_run": not_run,
        # the classes whose pseudo labels learned their context, and every class's share on GT background
        "cooccurrence_flagged": list(inputs.cooccurrence.flagged) if inputs.cooccurrence else [],
        "cooccurrence_on_background": {row.name: row.on_background for row in inputs.cooccurrence.classes}
        if inputs.cooccurrence else {},
        # per part run: its val part mIoU, identifiable-parts mIoU and adjacency error
        "parts": {str(run.get("entry")): {k: _finite_or_none((run.get("metrics") or {}).get(k))
                                          for k in ("miou", "miou_identifiable", "adjacency_error")}
                  for run in (inputs.parts.runs if inputs.parts else [])},
    }


def _not_run(inputs: ReportInputs) -> list[str]:
    missing = []
    if not inputs.refined_metrics:
        missing.append("CRF refinement")
    if not inputs.segmentation_metrics:
        missing.append("DeepLab")
    if not inputs.ceiling_metrics:
        missing.append("fully supervised ceiling")
    if not inputs.cam_curve:
        missing.append("CAM threshold sweep")
    if not inputs.training_curves:
        missing.append("training curves")
    if not inputs.gallery:
        missing.append("gallery")
    if inputs.cooccurrence is None:
        missing.append("co-occurrence")
    return missing


FITTED_HEADER = ["stage", "knob", "set", "value", "rule"]


def fitted_rows(provenance: dict[str, dict]) -> list[list[str]]:
    """The knobs each stage resolved from ``auto`` (stages/auto.py), from the stages' provenance."""
    return [[str(p.get("stage", name)), knob, str(r.get("set", "auto")), str(r.get("value")), str(r.get("rule", ""))]
            for name, p in provenance.items() for knob, r in (p.get("fitted") or {}).get("knobs", {}).items()]


def scale_warnings(provenance: dict[str, dict]) -> list[str]:
    """Hand-set scale-dependent knobs far from what ``auto`` would choose for this data."""
    return [f"{p.get('stage', name)}: {w}" for name, p in provenance.items()
            for w in (p.get("fitted") or {}).get("warnings", [])]


def stage_seconds(provenance: dict) -> float:
    """A stage's compute time: its own run plus, for a sharded stage, its shards' (summed over the shards: the
    run's ``seconds`` is then the join alone)."""
    own = _as_float(provenance.get("seconds"))
    shards = _as_float((provenance.get("metrics") or {}).get("shard_seconds"))
    return sum(s for s in (own, shards) if math.isfinite(s))


def _compute_seconds(provenance: dict[str, dict]) -> float:
    return float(sum(stage_seconds(p) for p in provenance.values()))


# ---------------------------------------------------------------------------------------------- figures

def _new_figure(width: float, height: float, dpi: int = 110):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=dpi)


def _png_bytes(fig, tight: bool = True) -> bytes:
    buffer = io.BytesIO()
    # No "Software" stamp: the bytes then depend on the drawing only.
    fig.savefig(buffer, format="png", bbox_inches="tight" if tight else None, metadata={"Software": None})
    return buffer.getvalue()


def _bar_chart(stages: list[_Stage], names: Sequence[str]) -> bytes:
    n_classes, n_stages = len(names), len(stages)
    fig = _new_figure(max(6.0, 0.22 * n_classes * (n_stages + 1)), 3.6)
    ax = fig.add_subplot()
    width = 0.8 / n_stages
    x = np.arange(n_classes)
    for i, stage in enumerate(stages):
        heights = [100 * _as_float(stage.per_class.get(name)) for name in names]
        seeds = stage.label == SEEDS_LABEL  # hatched and pale: a different measure from the other bars
        ax.bar(x + (i - (n_stages - 1) / 2) * width, heights, width, label=_mpl(stage.label),
               color=SERIES_COLOURS[i % len(SERIES_COLOURS)], alpha=0.45 if seeds else 1.0,
               hatch="///" if seeds else None, edgecolor="#333" if seeds else None, linewidth=0.3)
    ax.set_xticks(x)
    ax.set_xticklabels([_mpl(name) for name in names], rotation=45 if n_classes > 8 else 0,
                       ha="right" if n_classes > 8 else "center")
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    # Above the axes: below them the legend would collide with rotated class names.
    ax.legend(fontsize=8, ncol=min(n_stages, 6), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    return _png_bytes(fig)


def _parse_curve(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    thresholds, mious = [], []
    for n, row in enumerate(rows):
        if "threshold" not in row or "miou" not in row:
            raise ValueError(f"CAM curve row {n} needs 'threshold' and 'miou' columns, has {sorted(row)}")
        thresholds.append(_as_float(row["threshold"]))
        mious.append(_as_float(row["miou"]))
    t, m = np.asarray(thresholds), np.asarray(mious)
    order = np.argsort(t, kind="stable")
    return t[order], m[order]


def _cam_curve_figure(curve: list[dict], cam: dict) -> bytes:
    t, m = _parse_curve(curve)
    fig = _new_figure(5.5, 3.4)
    ax = fig.add_subplot()
    ax.plot(t, 100 * m, color=SERIES_COLOURS[0], lw=1.5, label="mIoU")
    chosen = _as_float(cam.get("threshold"))
    if math.isfinite(chosen):
        ax.axvline(chosen, color="#555", ls="--", lw=1,
                   label=f"chosen {chosen:.2f}: {format_percent(cam.get('miou'))}")
    best_t, best_m = _as_float(cam.get("best_threshold")), _as_float(cam.get("best_miou"))
    if not (math.isfinite(best_t) and math.isfinite(best_m)) and np.isfinite(m).any():
        best = int(np.nanargmax(m))
        best_t, best_m = float(t[best]), float(m[best])
    if math.isfinite(best_t) and math.isfinite(best_m):
        ax.scatter([best_t], [100 * best_m], color=SERIES_COLOURS[3], zorder=3,
                   label=f"best {best_t:.2f}: {100 * best_m:.1f} (GT-tuned)")
    ax.set_xlabel("background threshold")
    ax.set_ylabel("mIoU (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png_bytes(fig)


@dataclass
class _Run:
    name: str
    iteration: np.ndarray
    loss: np.ndarray
    val_epoch: np.ndarray
    val_miou: np.ndarray
    seconds: float
    train_miou: np.ndarray          # at the val rows (NaN where not scored)


def _column(rows: list[dict], *keys: str) -> np.ndarray | None:
    for key in keys:
        if any(key in row for row in rows):
            return np.asarray([_as_float(row.get(key)) for row in rows])
    return None


def _parse_run(name: str, rows: list[dict]) -> _Run:
    index = np.arange(1, len(rows) + 1, dtype=np.float64)
    iteration = _column(rows, "iteration", "step")
    iteration = index if iteration is None or not np.isfinite(iteration).any() else iteration
    loss = _column(rows, "loss")
    loss = np.full(len(rows), np.nan) if loss is None else loss
    epoch = _column(rows, "epoch")
    epoch = index if epoch is None else epoch
    val = _column(rows, "val_miou")
    val = np.full(len(rows), np.nan) if val is None else val
    has_val = np.isfinite(val) & np.isfinite(epoch)
    seconds = _column(rows, "seconds")
    # The logs' seconds are elapsed since the start of training: the run's wall time is the largest.
    wall = float(np.nanmax(seconds)) if seconds is not None and np.isfinite(seconds).any() else math.nan
    train = _column(rows, "train_miou")
    train = np.full(len(rows), np.nan) if train is None else train
    return _Run(name, iteration, loss, epoch[has_val], val[has_val], wall, train[has_val])


def _training_figure(runs: list[_Run]) -> bytes:
    from matplotlib.ticker import MaxNLocator

    with_val = [run for run in runs if run.val_miou.size]
    ncols = 2 if with_val else 1
    fig = _new_figure(5.0 * ncols, 3.3)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for i, run in enumerate(runs):
        keep = np.isfinite(run.loss) & np.isfinite(run.iteration)
        axes[0].plot(run.iteration[keep], run.loss[keep], lw=1.2, label=_mpl(run.name),
                     color=SERIES_COLOURS[i % len(SERIES_COLOURS)])
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss")
    axes[0].grid(alpha=0.3)
    if with_val:
        for i, run in enumerate(with_val):
            colour = SERIES_COLOURS[i % len(SERIES_COLOURS)]
            axes[1].plot(run.val_epoch, 100 * run.val_miou, marker="o", ms=3, lw=1.2, label=_mpl(run.name),
                         color=colour)
            scored = np.isfinite(run.train_miou)
            if scored.any():
                axes[1].plot(run.val_epoch[scored], 100 * run.train_miou[scored], ls="--", lw=1.0, color=colour,
                             label=_mpl(f"{run.name}: train"))
        axes[1].set_xlabel("epoch")
        axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[1].set_ylabel("mIoU (%): val, train dashed")
        axes[1].grid(alpha=0.3)
    if len(runs) > 1:
        axes[0].legend(fontsize=8)
        if with_val:
            axes[1].legend(fontsize=8)
    else:
        fig.suptitle(_mpl(runs[0].name), fontsize=10)
    return _png_bytes(fig)


def _loss_grid_figure(runs: list[_Run]) -> bytes:
    """One small panel per run: its loss against the optimiser step."""
    ncols = min(3, len(runs))
    nrows = -(-len(runs) // ncols)
    fig = _new_figure(3.4 * ncols, 2.4 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, run in zip(axes.flat, runs):
        keep = np.isfinite(run.loss) & np.isfinite(run.iteration)
        ax.plot(run.iteration[keep], run.loss[keep], lw=1.2, color=SERIES_COLOURS[0])
        ax.set_title(_mpl(run.name), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("loss", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(runs):]:
        ax.set_visible(False)
    fig.tight_layout()
    return _png_bytes(fig)


def _label_rgb(labels: np.ndarray, palette: np.ndarray, what: str) -> np.ndarray:
    if labels.ndim != 2:
        raise ValueError(f"{what}: a label map must be 2-D (H, W), got shape {labels.shape}")
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        if not np.issubdtype(labels.dtype, np.floating) or not np.all(labels == np.round(labels)):
            raise ValueError(f"{what}: a label map must hold integer class indices, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"{what}: label values must lie in 0..255, found {labels.min()}..{labels.max()}")
    return palette[labels.astype(np.uint8)]


def _resize(array: np.ndarray, size_hw: tuple[int, int], nearest: bool) -> np.ndarray:
    if array.shape[:2] == size_hw:
        return array
    mode = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    img = Image.fromarray(array.astype(np.uint8) if nearest else array.astype(np.float32))
    return np.asarray(img.resize((size_hw[1], size_hw[0]), mode))


def _image_rgb(image: np.ndarray, what: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"{what}: the image must be (H, W, 3) RGB, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"{what}: the image must be uint8, got dtype {image.dtype}")
    return image[..., :3]


def _cam_rgb(cam: np.ndarray, size_hw: tuple[int, int], image: np.ndarray | None, what: str) -> np.ndarray:
    import matplotlib

    cam = np.asarray(cam)
    if cam.ndim != 2 or not np.issubdtype(cam.dtype, np.number):
        raise ValueError(f"{what}: the CAM must be a numeric (H, W) map, got shape {cam.shape}, dtype {cam.dtype}")
    cam = np.clip(np.nan_to_num(cam.astype(np.float32), nan=0.0), 0.0, 1.0)
    cam = np.clip(_resize(cam, size_hw, nearest=False), 0.0, 1.0)
    heat = matplotlib.colormaps["jet"](cam)[..., :3] * 255
    if image is None:
        return heat.astype(np.uint8)
    return np.round(0.5 * image.astype(np.float32) + 0.5 * heat).astype(np.uint8)


def gallery_rows(gallery: list[tuple[str, dict[str, np.ndarray]]], palette: np.ndarray
                 ) -> tuple[list[str], list[tuple[str, dict[str, np.ndarray]]]]:
    """The panel kinds shown (display order) and, per image, each panel as RGB at the image's size."""
    kinds_present: set[str] = set()
    rendered = []
    for image_id, panels in gallery:
        unknown = sorted(set(panels) - set(PANEL_TITLES))
        if unknown:
            raise ValueError(f"gallery image {image_id!r}: unknown panels {unknown}; "
                             f"expected some of {list(PANEL_TITLES)}")
        panels = {kind: np.asarray(array) for kind, array in panels.items() if array is not None}
        if not panels:
            continue
        # Everything is drawn at the image's size (or the first panel's, without an image).
        first = "image" if "image" in panels else next(k for k in PANEL_TITLES if k in panels)
        size_hw = tuple(int(n) for n in panels[first].shape[:2])
        image = _image_rgb(panels["image"], f"gallery {image_id!r} image") if "image" in panels else None
        row = {}
        for kind, array in panels.items():
            what = f"gallery {image_id!r} panel {kind!r}"
            if kind == "image":
                row[kind] = image
            elif kind == "cam":
                row[kind] = _cam_rgb(array, size_hw, image, what)
            else:
                row[kind] = _label_rgb(_resize(_check_labels(array, what), size_hw, nearest=True), palette, what)
        kinds_present.update(row)
        rendered.append((str(image_id), row))
    return [kind for kind in PANEL_TITLES if kind in kinds_present], rendered


def _check_labels(labels: np.ndarray, what: str) -> np.ndarray:
    _label_rgb(labels, np.zeros((256, 3), np.uint8), what)  # validation only
    return labels.astype(np.uint8)


def _panel_grid(columns: list[tuple[str, str]], rows: list[tuple[str, dict[str, np.ndarray]]], *,
                panel_width: float, extra_height: float, title_size: int, frame_missing: bool):
    """A figure of image panels: one row per (image id, {column key: image}), one column per (key, title); a
    missing panel says so (framed or not). Rows are as tall as their first panel's aspect ratio asks."""
    ratios = [max(0.2, next(iter(panels.values())).shape[0] / next(iter(panels.values())).shape[1])
              for _, panels in rows]
    fig = _new_figure(panel_width * len(columns) + 0.4, panel_width * sum(ratios) + extra_height, dpi=120)
    axes = fig.subplots(len(rows), len(columns), squeeze=False, gridspec_kw={"height_ratios": ratios})
    for r, (image_id, panels) in enumerate(rows):
        for c, (key, title) in enumerate(columns):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if key in panels:
                ax.imshow(panels[key], interpolation="nearest")
            else:
                ax.text(0.5, 0.5, "missing", ha="center", va="center", color="#999", transform=ax.transAxes)
                for spine in ax.spines.values():
                    spine.set_visible(frame_missing)
            if r == 0:
                ax.set_title(title, fontsize=title_size)
            if c == 0:
                ax.set_ylabel(_mpl(image_id), fontsize=8)
    return fig


def _gallery_figure(kinds: list[str], rows: list[tuple[str, dict[str, np.ndarray]]], names: Sequence[str],
                    palette: np.ndarray) -> bytes:
    from matplotlib.patches import Patch

    fig = _panel_grid([(kind, PANEL_TITLES[kind]) for kind in kinds], rows, panel_width=1.7, extra_height=0.5,
                      title_size=9, frame_missing=False)
    if any(kind in LABEL_PANELS for kind in kinds):
        handles = [Patch(facecolor=palette[i] / 255, edgecolor="#666", label=_mpl(name))
                   for i, name in enumerate(names)]
        handles.append(Patch(facecolor=palette[255] / 255, edgecolor="#666", label="ignore"))
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(handles), 6),
                   fontsize=8, frameon=False)
    fig.subplots_adjust(left=0.03, right=0.99, bottom=0.01, top=0.95, wspace=0.04, hspace=0.06)
    return _png_bytes(fig)


def _part_iou_heatmap(parts: PartsInputs) -> bytes:
    """Per-part IoU (%) of every run as a heat map: rows the runs, columns the parts, each cell annotated."""
    import matplotlib

    names = parts.part_names
    values = 100 * np.array([_part_iou(run, len(names)) for run in parts.runs], np.float64).reshape(-1, len(names))
    fig = _new_figure(max(6.0, 0.42 * len(names) + 2.5), 0.4 * len(parts.runs) + 1.9)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#eeeeee")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0, vmax=100, aspect="auto",
                      interpolation="nearest")
    for r, c in np.ndindex(values.shape):
        if np.isfinite(values[r, c]):
            ax.text(c, r, f"{values[r, c]:.0f}", ha="center", va="center", fontsize=6,
                    color="white" if values[r, c] < 60 else "black")
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels([_mpl(name) for name in names], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(np.arange(len(parts.runs)))
    ax.set_yticklabels([_mpl(run.get("entry")) for run in parts.runs], fontsize=8)
    fig.colorbar(image, ax=ax, label="IoU (%)", fraction=0.025, pad=0.01)
    return _png_bytes(fig)


def parts_gallery_rows(parts: PartsInputs) -> tuple[list[str], list[tuple[str, dict[str, np.ndarray]]]]:
    """The column titles (first seen first) and, per image, each panel as RGB at the image's size: object maps in
    the object palette, part maps in the part palette."""
    palettes = {"objects": parts.object_palette, "parts": parts.part_palette}
    titles: list[str] = []
    rendered = []
    for image_id, panels in parts.gallery:
        if not panels:
            continue
        sizes = [np.asarray(array).shape[:2] for _, kind, array in panels if kind == "image"]
        size_hw = tuple(int(n) for n in (sizes[0] if sizes else np.asarray(panels[0][2]).shape[:2]))
        row = {}
        for title, kind, array in panels:
            what = f"parts gallery {image_id!r} panel {title!r}"
            if kind == "image":
                row[title] = _image_rgb(array, what)
            elif kind in palettes:
                labels = _resize(_check_labels(np.asarray(array), what), size_hw, nearest=True)
                row[title] = _label_rgb(labels, palettes[kind], what)
            else:
                raise ValueError(f"{what}: kind must be image, objects or parts, got {kind!r}")
            if title not in titles:
                titles.append(title)
        rendered.append((str(image_id), row))
    return titles, rendered


def _parts_gallery_figure(titles: list[str], rows: list[tuple[str, dict[str, np.ndarray]]]) -> bytes:
    fig = _panel_grid([(title, _mpl(title)) for title in titles], rows, panel_width=1.5, extra_height=0.6,
                      title_size=8, frame_missing=True)
    fig.subplots_adjust(left=0.03, right=0.99, bottom=0.01, top=0.93, wspace=0.04, hspace=0.06)
    return _png_bytes(fig)


def _swatches(names: Sequence[str], palette: np.ndarray) -> str:
    return "".join(f'<span class="swatch" style="background: rgb({r},{g},{b})"></span>{_esc(name)}'
                   for name, (r, g, b) in zip([*names, "ignore"], [*palette[: len(names)], palette[255]]))


def _parts_html(parts: PartsInputs, figures: _Figures) -> list[str]:
    out = [f"<p>{_esc(PARTS_NOTE)}</p>", _table(PARTS_HEADER, parts_rows(parts), numeric=PARTS_NUMERIC)]
    png = figures.add("part_iou", _part_iou_heatmap(parts))
    out.append(_figure(png, "per-part IoU of every part run", "Per-part IoU (%) on val, one row per run; grey: "
                                                               "the part is absent (IoU undefined)."))
    header, rows = part_iou_rows(parts)
    out.append(f"<details><summary>Per-part IoU table ({len(parts.part_names)} parts)</summary>")
    out.append(_table(header, rows, numeric=[False] + [True] * len(parts.runs),
                      row_classes=[""] * len(parts.part_names) + ["mean"]))
    out.append("</details>")
    titles, rendered = parts_gallery_rows(parts)
    if rendered:
        png = figures.add("parts_gallery", _parts_gallery_figure(titles, rendered))
        out.append(_figure(png, "part segmentation gallery",
                           "Val images (" + ", ".join(image_id for image_id, _ in rendered) + "); columns: "
                           + ", ".join(titles) + ". Object maps: the argmax of the conditioning maps (ignore colour "
                           "where they are uniform); part maps in the part palette."))
        out.append(f'<p class="meta">Part colours: {_swatches(parts.part_names, parts.part_palette)}</p>')
        out.append(f'<p class="meta">Object colours: {_swatches(parts.object_names, parts.object_palette)}</p>')
    else:
        out.append(_not_run_line("No part gallery images were given."))
    return out


# ------------------------------------------------------------------------------------------------- HTML

def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool] = (),
           row_classes: Sequence[str] = ()) -> str:
    numeric = list(numeric) + [False] * (len(header) - len(numeric))

    def cell(tag: str, text: str, is_num: bool) -> str:
        css = ' class="num"' if is_num else ""
        return f"<{tag}{css}>{_esc(text)}</{tag}>"

    lines = ['<div class="wide"><table>',
             "<thead><tr>" + "".join(cell("th", h, n) for h, n in zip(header, numeric)) + "</tr></thead>", "<tbody>"]
    for i, row in enumerate(rows):
        css = row_classes[i] if i < len(row_classes) and row_classes[i] else ""
        opening = f'<tr class="{_esc(css)}">' if css else "<tr>"
        lines.append(opening + "".join(cell("td", text, n) for text, n in zip(row, numeric)) + "</tr>")
    lines += ["</tbody>", "</table></div>"]
    return "\n".join(lines)


def _figure(png: bytes, alt: str, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{_esc(alt)}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


def _not_run_line(text: str) -> str:
    return f'<p class="not-run">{_esc(text)}</p>'


def _merged_versions(provenance: dict[str, dict]) -> list[tuple[str, str]]:
    values: dict[str, set[str]] = {}
    for record in provenance.values():
        for key, value in (record.get("versions") or {}).items():
            values.setdefault(str(key), set()).add(str(value))
    return [(key, ", ".join(sorted(values[key]))) for key in sorted(values)]


class _Figures:
    """Collects the figure PNGs, written under figures/ and inlined in the page."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.written: dict[str, bytes] = {}

    def add(self, stem: str, png: bytes) -> bytes:
        name = f"{stem}.png"
        n = 2
        while name in self.written:
            name, n = f"{stem}-{n}.png", n + 1
        with atomic_path(self.directory / name) as tmp:
            tmp.write_bytes(png)
        self.written[name] = png
        return png


def _per_class_rows(stages: list[_Stage], names: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    header = ["class", *(stage.label for stage in stages)]
    rows = [[name, *(format_percent(stage.per_class.get(name)) for stage in stages)] for name in names]
    rows.append(["mean (mIoU)", *(format_percent(stage.miou) for stage in stages)])
    return header, rows


def _render_html(inputs: ReportInputs, names: list[str], palette: np.ndarray, figures: _Figures,
                 compute_seconds: float) -> str:
    generated = inputs.generated or datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    hosts = sorted({str(p["host"]) for p in inputs.provenance.values() if p.get("host")})
    started = sorted(str(p["started"]) for p in inputs.provenance.values() if p.get("started"))
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{_esc(inputs.title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
           f"<h1>{_esc(inputs.title)}</h1>",
           f'<p class="meta">Report generated {_esc(generated)}'
           + (f"; run started {_esc(started[0])}" if started else "")
           + f"; host {_esc(', '.join(hosts) if hosts else '-')}"
           + f"; {len(inputs.provenance)} stages; total compute time {_esc(format_duration(compute_seconds))}"
           + f" ({_esc(f'{compute_seconds:.1f}')} s, summed over the stages).</p>"]
    versions = _merged_versions(inputs.provenance)
    if versions:
        out.append('<p class="meta">Versions: ' + "; ".join(f"{_esc(k)} {_esc(v)}" for k, v in versions) + "</p>")
    optional = {"methods": len(inputs.comparison) > 1, "parts": inputs.parts is not None,
                "segmenters": bool(inputs.segmenters)}
    shown = [(sid, title) for sid, title in SECTIONS if optional.get(sid, True)]
    out.append("<nav>" + "".join(f'<a href="#{sid}">{_esc(title)}</a>' for sid, title in shown) + "</nav>")
    titles = dict(SECTIONS)

    def heading(section_id: str) -> None:
        out.append(f'<h2 id="{section_id}">{_esc(titles[section_id])}</h2>')

    heading("headline")
    headline = headline_rows(inputs)
    out.append(_table(["stage", "mIoU (%)", "details"], headline, numeric=[False, True, False]))
    out.append('<p class="meta">CAMs, seeds and pseudo labels are scored on the eval (training) images, DeepLab '
               "and the ceiling on val; one dataset-level confusion matrix, background included, GT 255 ignored.</p>")
    if inputs.cooccurrence is not None and inputs.cooccurrence.flagged:
        out.append(f'<p class="flag">{_esc(cooccurrence_flag_line(inputs.cooccurrence))}</p>')
    out.extend(f'<p class="flag">{_esc(warning)}</p>' for warning in scale_warnings(inputs.provenance))
    if optional["methods"]:  # the main chain alone is the headline table again
        heading("methods")
        out.append(f"<p>{_esc(COMPARISON_NOTE)}</p>")
        out.append(_table(COMPARISON_HEADER, comparison_rows(inputs), numeric=COMPARISON_NUMERIC))
    if inputs.parts is not None:
        heading("parts")
        out += _parts_html(inputs.parts, figures)
    if inputs.segmenters:
        heading("segmenters")
        out.append(f"<p>{_esc(SEGMENTERS_NOTE)}</p>")
        out.append(_table(SEGMENTERS_HEADER, segmenter_rows(inputs), numeric=[False, False] + [True] * 4))

    heading("per-class")
    stages = per_class_stages(inputs, names)
    if stages:
        header, rows = _per_class_rows(stages, names)
        out.append(_table(header, rows, numeric=[False] + [True] * len(stages),
                          row_classes=[""] * len(names) + ["mean"]))
        png = figures.add("per_class_iou", _bar_chart(stages, names))
        out.append(_figure(png, "per-class IoU bar chart", "Per-class IoU at every stage; '-' in the table and a "
                                                           "missing bar mean the class is absent (IoU undefined)."))
    else:
        out.append(_not_run_line("Not run: no stage reported per-class IoU."))

    heading("cooccurrence")
    cooc = inputs.cooccurrence
    if cooc is not None:
        out.append(f"<p>{_esc(cooccurrence_note(cooc))}</p>")
        out.append(f'<p class="{"flag" if cooc.flagged else "meta"}">{_esc(cooccurrence_flag_line(cooc))}</p>')
        out.append(_table(cooccurrence_header(cooc), cooccurrence_rows(cooc), numeric=COOCCURRENCE_NUMERIC,
                          row_classes=["flagged" if row.flagged else "" for row in cooc.classes]))
    else:
        out.append(_not_run_line(COOCCURRENCE_NOT_RUN))

    heading("cam-curve")
    if inputs.cam_curve:
        png = figures.add("cam_threshold_curve", _cam_curve_figure(inputs.cam_curve, inputs.cam_metrics or {}))
        out.append(_figure(png, "CAM mIoU against background threshold",
                           "CAM mIoU against the background threshold; dashed: the configured threshold, dot: the "
                           "best one, chosen with GT (an upper bound)."))
    else:
        out.append(_not_run_line("Not run: no CAM threshold sweep was given."))

    heading("training")
    runs = [_parse_run(str(name), rows) for name, rows in inputs.training_curves.items() if rows]
    if runs:
        summary_rows = []
        for run in runs:
            best = int(np.argmax(run.val_miou)) if run.val_miou.size else None
            finite_loss = run.loss[np.isfinite(run.loss)]
            summary_rows.append([run.name, str(len(run.iteration)),
                                 f"{finite_loss[-1]:.4f}" if finite_loss.size else "-",
                                 format_percent(run.val_miou[best]) if best is not None else "-",
                                 f"{run.val_epoch[best]:g}" if best is not None else "-",
                                 format_percent(run.val_miou[-1]) if run.val_miou.size else "-",
                                 format_percent(run.train_miou[-1]) if run.train_miou.size else "-",
                                 format_duration(run.seconds)])
        out.append(_table(["run", "log rows", "final loss", "best val mIoU (%)", "at epoch", "final val mIoU (%)",
                           "final train mIoU (%)", "wall time"],
                          summary_rows, numeric=[False] + [True] * 7))
        png = figures.add("training_losses", _loss_grid_figure(runs))
        out.append(_figure(png, "training loss of every trained stage",
                           "Loss against optimiser step of every trained stage (its log.csv; the y axis is each "
                           "stage's own loss, not comparable across stages)."))
        validated = [run for run in runs if run.val_miou.size]
        if validated:
            png = figures.add("training_validation", _training_figure(validated))
            out.append(_figure(png, "training curves of the validated runs",
                               "Runs with a validation mIoU (" + ", ".join(run.name for run in validated)
                               + "): loss against step and val mIoU against epoch, overlaid."))
    else:
        out.append(_not_run_line("Not run: no training curves were given."))

    heading("gallery")
    kinds, rendered = gallery_rows(inputs.gallery, palette) if inputs.gallery else ([], [])
    if rendered:
        png = figures.add("gallery", _gallery_figure(kinds, rendered, names, palette))
        out.append(_figure(png, "qualitative gallery",
                           "Rows: images (" + ", ".join(image_id for image_id, _ in rendered) + "); columns: "
                           + ", ".join(PANEL_TITLES[k] for k in kinds) + ". The images are eval images, i.e. "
                           "training images: DeepLab was trained on their pseudo labels (its val figures are in "
                           "the tables). CAM: heat map (jet, 0 to 1) blended over the image; label maps in colours "
                           "chosen to stay distinct with colour-vision deficiencies (the label PNGs on disk keep "
                           "the label space's palette)."))
        out.append(f'<p class="meta">Colours: {_swatches(names, palette)}</p>')
    else:
        out.append(_not_run_line("Not run: no gallery images were given."))

    heading("configuration")
    if inputs.config:
        for section, knobs in inputs.config.items():
            out.append(f"<details><summary>[{_esc(section)}] ({len(knobs)} knobs)</summary>")
            out.append(_table(["knob", "value"], [[str(k), format_value(v)] for k, v in knobs.items()]))
            out.append("</details>")
    else:
        out.append(_not_run_line("No configuration was given."))
    fitted = fitted_rows(inputs.provenance)
    if fitted:
        out.append("<h3>Knobs fitted to the data (<code>auto</code>)</h3>")
        out.append(_table(FITTED_HEADER, fitted, numeric=[False, False, False, True, False]))

    heading("provenance")
    if inputs.provenance:
        rows = [[str(p.get("stage", name)), str(p.get("key", "-")), f"{stage_seconds(p):.1f}",
                 "-" if p.get("seed") is None else str(p["seed"]), str(p.get("code_digest", "-")),
                 str(p.get("started", "-")), str(p.get("host", "-"))]
                for name, p in inputs.provenance.items()]
        out.append(f"<details><summary>{len(rows)} stages, {_esc(format_duration(compute_seconds))} in all</summary>")
        out.append(_table(["stage", "key", "seconds", "seed", "code digest", "started", "host"], rows,
                          numeric=[False, False, True, True, False, False, False]))
        out.append("</details>")
    else:
        out.append(_not_run_line("No provenance records were given."))

    heading("notes")
    not_run = _not_run(inputs)
    items = [*map(str, inputs.notes)]
    if not_run:
        items.append("Not run: " + ", ".join(not_run) + ".")
    if items:
        out.append("<ul>" + "".join(f"<li>{_esc(item)}</li>" for item in items) + "</ul>")
    else:
        out.append("<p>No warnings.</p>")
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------- Markdown

def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool] = ()) -> list[str]:
    numeric = list(numeric) + [False] * (len(header) - len(numeric))
    lines = ["| " + " | ".join(_md(h) for h in header) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(_md(cell) for cell in row) + " |" for row in rows]
    return lines


def _render_markdown(inputs: ReportInputs, names: list[str], compute_seconds: float) -> str:
    lines = [f"# {_md(inputs.title)}", "",
             f"Total compute time {format_duration(compute_seconds)} over {len(inputs.provenance)} stages. "
             f"Percentages; '-' = not run or undefined. Full report with figures: {HTML_NAME}.", "",
             "## Headline results", ""]
    lines += _md_table(["stage", "mIoU (%)", "details"], headline_rows(inputs), numeric=[False, True, False])
    if inputs.cooccurrence is not None:
        lines += ["", _md(cooccurrence_flag_line(inputs.cooccurrence))]
    lines += [f"\n**{_md(warning)}**" for warning in scale_warnings(inputs.provenance)]
    if len(inputs.comparison) > 1:
        lines += ["", "## Propagation methods compared", "", COMPARISON_NOTE, ""]
        lines += _md_table(COMPARISON_HEADER, comparison_rows(inputs), numeric=COMPARISON_NUMERIC)
    if inputs.parts is not None:
        lines += ["", f"## {dict(SECTIONS)['parts']}", "", PARTS_NOTE, ""]
        lines += _md_table(PARTS_HEADER, parts_rows(inputs.parts), numeric=PARTS_NUMERIC)
        header, rows = part_iou_rows(inputs.parts)
        lines += ["", "Per-part IoU (%):", ""]
        lines += _md_table(header, rows, numeric=[False] + [True] * len(inputs.parts.runs))
    if inputs.segmenters:
        lines += ["", "## Segmenters compared", "", SEGMENTERS_NOTE, ""]
        lines += _md_table(SEGMENTERS_HEADER, segmenter_rows(inputs), numeric=[False, False] + [True] * 4)
    lines += ["", "## Per-class IoU", ""]
    stages = per_class_stages(inputs, names)
    if stages:
        header, rows = _per_class_rows(stages, names)
        lines += _md_table(header, rows, numeric=[False] + [True] * len(stages))
    else:
        lines.append("Not run: no stage reported per-class IoU.")
    lines += ["", "## Co-occurrence", ""]
    if inputs.cooccurrence is not None:
        lines += [_md(cooccurrence_note(inputs.cooccurrence)), ""]
        lines += _md_table(cooccurrence_header(inputs.cooccurrence), cooccurrence_rows(inputs.cooccurrence),
                           numeric=COOCCURRENCE_NUMERIC)
    else:
        lines.append(COOCCURRENCE_NOT_RUN)
    lines += ["", "## Configuration", ""]
    for section, knobs in inputs.config.items():
        lines.append(f"- **[{_md(section)}]** " + ", ".join(f"`{k} = {format_value(v)}`" for k, v in knobs.items()))
    if not inputs.config:
        lines.append("No configuration was given.")
    if fitted_rows(inputs.provenance):
        lines += ["", "Knobs fitted to the data (`auto`):", ""]
        lines += _md_table(FITTED_HEADER, fitted_rows(inputs.provenance), numeric=[False, False, False, True])
    notes = [*map(str, inputs.notes)]
    not_run = _not_run(inputs)
    if not_run:
        notes.append("Not run: " + ", ".join(not_run) + ".")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {_md(note)}" for note in notes]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------- the entry

def write_report(inputs: ReportInputs, out_dir: Path) -> dict:
    """Write report.html, report.md and figures/*.png into ``out_dir``; return the headline numbers.

    The summary's metrics are fractions (None where a stage did not run or the value is undefined);
    ``segmentation_to_ceiling`` is DeepLab's val mIoU over the ceiling's, also a fraction.
    """
    names = _check_class_names(inputs.class_names)
    _check_palette(inputs.palette)
    palette = figure_palette(len(names))  # the label PNGs keep inputs.palette (stages.report.colours)
    if inputs.parts is not None:
        parts = _check_parts(inputs.parts)
        inputs = dataclasses.replace(inputs, parts=dataclasses.replace(
            parts, part_palette=figure_palette(len(parts.part_names)),
            object_palette=figure_palette(len(parts.object_names))))
    out_dir = Path(out_dir)
    figures = _Figures(out_dir / FIGURES_DIR)
    compute_seconds = _compute_seconds(inputs.provenance)
    page = _render_html(inputs, names, palette, figures, compute_seconds)
    markdown = _render_markdown(inputs, names, compute_seconds)
    with atomic_path(out_dir / HTML_NAME) as tmp:
        tmp.write_text(page, encoding="utf-8")
    with atomic_path(out_dir / MARKDOWN_NAME) as tmp:
        tmp.write_text(markdown, encoding="utf-8")
    summary = _summary(inputs, compute_seconds, _not_run(inputs))
    summary.update({"html": str(out_dir / HTML_NAME), "markdown": str(out_dir / MARKDOWN_NAME),
                    "figures": sorted(figures.written),
                    "gallery_images": sum(any(array is not None for array in panels.values())
                                          for _, panels in inputs.gallery or [])})
    return summary

"""The run report: a self-contained HTML page and a Markdown summary built from small fake inputs."""

from __future__ import annotations

import base64
import io
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.labelspace import voc_palette
from stages.report.html import ReportInputs, gallery_rows, write_report

NAMES = ["background", "a<b", "cat", "dog & co"]
SECTION_TITLES = ["Headline results", "Per-class IoU", "Co-occurrence", "CAM threshold curve", "Training curves",
                  "Gallery", "Configuration", "Provenance", "Notes"]
H, W = 30, 40


def pct(value: float) -> str:
    """The report's percentage format, written out independently of the module."""
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def per_class(rng: np.random.Generator, absent: str | None = None) -> dict[str, float]:
    values = {name: float(rng.uniform(0.2, 0.9)) for name in NAMES}
    if absent:
        values[absent] = math.nan
    return values


def seg_metrics(rng: np.random.Generator, crf: bool) -> dict:
    iou = per_class(rng)
    return {"miou": float(np.mean(list(iou.values()))), "per_class_iou": iou, "pixel_accuracy": 0.91,
            "mean_accuracy": 0.8, "fwiou": 0.85, "n_images": 12, "crf": crf}


def training_rows(rng: np.random.Generator, epochs: int, steps: int) -> list[dict]:
    rows = []
    for epoch in range(1, epochs + 1):
        for step in range(steps):
            last = step == steps - 1
            rows.append({"epoch": epoch, "iteration": (epoch - 1) * steps + step + 1,
                         "loss": float(2.0 / epoch + rng.uniform(0, 0.1)), "lr": 0.01,
                         # CSV rows without evaluation carry an empty cell
                         "val_miou": float(rng.uniform(0.3, 0.7)) if last else "",
                         "train_miou": float(rng.uniform(0.6, 0.9)) if last else "",
                         "seconds": float(epoch * steps + step)})
    return rows


def label_map(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    labels = rng.integers(0, len(NAMES), shape).astype(np.uint8)
    labels[0, :] = 255  # an ignore band, as along VOC borders
    return labels


def cooccurrence(rng: np.random.Generator):
    """The co-occurrence table of random pseudo labels against random GT (tests/test_cooccurrence.py checks it)."""
    from stages.report.cooccurrence import CooccurrenceTally

    tally = CooccurrenceTally(NAMES)
    for scene in ("water", "grass"):
        tally.add(label_map(rng, (H, W)), label_map(rng, (H, W)), scene)
    tally.add_val(label_map(rng, (H, W)), label_map(rng, (H, W)))
    return tally.result(threshold=0.5)


def make_inputs(seed: int = 0) -> ReportInputs:
    rng = np.random.default_rng(seed)
    cam_iou = per_class(rng, absent="dog & co")
    pseudo_iou = per_class(rng)
    seed_iou = [float(v) for v in rng.uniform(0.4, 0.95, len(NAMES))]
    gallery = []
    for n in range(2):
        gallery.append((f"img<{n}>", {
            "image": rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
            "cam": rng.uniform(0, 1, (H // 2, W // 2)),            # half size: bilinear resize
            "seeds": label_map(rng, (H // 2, W // 2)),             # half size: nearest upsizing
            "pseudo": label_map(rng, (H, W)),
            "prediction": label_map(rng, (2 * H, 2 * W)),          # double size: nearest resize
            "gt": label_map(rng, (H, W)),
            **({"crf": label_map(rng, (H, W))} if n == 0 else {}),  # missing on the second image
        }))
    provenance = {
        stage: {"stage": stage, "key": f"{stage.lower()}-{i:04d}", "params": {}, "seed": i,
                "versions": {"python": "3.11.7", "torch": "2.13.0"}, "host": "node<1>",
                "started": f"2024-05-0{i + 1}T10:00:00", "seconds": 10.5 * (i + 1), "metrics": {},
                "code_digest": f"digest{i}"}
        for i, stage in enumerate(["TrainCAM", "MakeCAM", "EvalCAM", "EvalPseudoLabels"])
    }
    return ReportInputs(
        title="Run <report> & co",
        class_names=list(NAMES),
        palette=voc_palette(),
        config={"TrainCAM": {"lr": 0.1, "num_epochs": 5, "cam_method": "cam", "pretrained": ""},
                "EvalCAM": {"bg_threshold": 0.15, "sweep": [0.05, 0.5, 0.05]}},
        provenance=provenance,
        cam_metrics={"miou": float(np.nanmean(list(cam_iou.values()))), "threshold": 0.15,
                     "per_class_iou": cam_iou, "best_miou": 0.61, "best_threshold": 0.25, "n_images": 24},
        cam_curve=[{"threshold": str(t), "miou": str(0.4 + 0.2 * math.sin(3 * t)), "pixel_accuracy": "0.8"}
                   for t in np.round(np.arange(0.05, 0.55, 0.05), 2)],
        pseudo_metrics={"miou": float(np.mean(list(pseudo_iou.values()))), "per_class_iou": pseudo_iou,
                        "n_images": 24,
                        "chain": {"cam_miou": 0.5, "seed_miou": 0.7, "seed_precision": 0.8,
                                  "seed_labelled_fraction": 0.35, "pseudo_label_miou": 0.6},
                        "seeds": {"miou": float(np.mean(seed_iou)), "precision": 0.83, "labelled_fraction": 0.37,
                                  "iou": seed_iou,
                                  "classes": {name: {"precision": 0.8, "recall": 0.3, "coverage": 0.4}
                                              for name in NAMES}}},
        refined_metrics={"miou": 0.66, "per_class_iou": per_class(rng)},
        segmentation_metrics=seg_metrics(rng, crf=True),
        ceiling_metrics=seg_metrics(rng, crf=False),
        training_curves={"DeepLab": training_rows(rng, 3, 4), "DeepLab (GT ceiling)": training_rows(rng, 3, 4)},
        gallery=gallery,
        cooccurrence=cooccurrence(rng),
        notes=["2 images quarantined: <bad>.jpg"],
        generated="2024-05-05 12:00",
    )


class TableReader(HTMLParser):
    """Every table as a list of rows of (unescaped) cell texts, plus every img src and href."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.headings: list[str] = []
        self.sources: list[str] = []
        self.links: list[str] = []
        self._cell: list[str] | None = None
        self._heading: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "h2":
            self._heading = []
        elif tag == "img":
            self.sources.append(attrs.get("src", ""))
        elif tag == "a":
            self.links.append(attrs.get("href", ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "h2":
            self.headings.append("".join(self._heading))
            self._heading = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._heading is not None:
            self._heading.append(data)


def read_html(path: Path) -> tuple[str, TableReader]:
    text = path.read_text(encoding="utf-8")
    reader = TableReader()
    reader.feed(text)
    return text, reader


def table_starting(reader: TableReader, first_header: str) -> list[list[str]]:
    found = [t for t in reader.tables if t and t[0] and t[0][0] == first_header]
    assert found, f"no table with first header {first_header!r}"
    return found[0]


def test_full_report(tmp_path):
    inputs = make_inputs()
    summary = write_report(inputs, tmp_path)
    html_path, md_path = tmp_path / "report.html", tmp_path / "report.md"
    assert html_path.is_file() and md_path.is_file()
    text, reader = read_html(html_path)

    assert reader.headings == SECTION_TITLES

    # headline table: stage -> mIoU cell
    headline = {row[0]: row for row in table_starting(reader, "stage")[1:]}
    cam, pseudo, seg, ceiling = (inputs.cam_metrics, inputs.pseudo_metrics, inputs.segmentation_metrics,
                                 inputs.ceiling_metrics)
    assert headline["CAM (threshold 0.15)"][1] == pct(cam["miou"])
    assert headline["CAM (best threshold 0.25)"][1] == pct(cam["best_miou"])
    seeds = pseudo["seeds"]
    assert headline["Seeds (labelled pixels)"][1] == pct(seeds["miou"])
    assert f"precision {pct(seeds['precision'])}" in headline["Seeds (labelled pixels)"][2]
    assert pct(seeds["labelled_fraction"]) in headline["Seeds (labelled pixels)"][2]
    assert headline["Pseudo labels (before CRF)"][1] == pct(pseudo["miou"])
    assert headline["Pseudo labels (after CRF)"][1] == pct(inputs.refined_metrics["miou"])
    assert headline["DeepLab on val"][1] == pct(seg["miou"])
    assert headline["Fully supervised ceiling"][1] == pct(ceiling["miou"])
    ratio = seg["miou"] / ceiling["miou"]
    assert headline["DeepLab / ceiling"][1] == f"{100 * ratio:.1f}%"

    # per-class table: one row per class, a NaN IoU shows as "-", a mean row last
    per_class_table = table_starting(reader, "class")
    header, rows = per_class_table[0], per_class_table[1:]
    assert len(header) == 7  # class + CAM, seeds, pseudo, CRF, DeepLab, ceiling
    assert [row[0] for row in rows] == [*NAMES, "mean (mIoU)"]
    stage_ious = [cam["per_class_iou"], dict(zip(NAMES, seeds["iou"])), pseudo["per_class_iou"],
                  inputs.refined_metrics["per_class_iou"], seg["per_class_iou"], ceiling["per_class_iou"]]
    for row, name in zip(rows, NAMES):
        assert row[1:] == [pct(ious[name]) for ious in stage_ious]
    assert rows[NAMES.index("dog & co")][1] == "-"
    assert rows[-1][1:] == [pct(m) for m in (cam["miou"], seeds["miou"], pseudo["miou"],
                                              inputs.refined_metrics["miou"], seg["miou"], ceiling["miou"])]

    # escaping: class names, title, ids, notes, hosts never appear raw
    for raw in ("a<b", "<report>", "img<0>", "<bad>", "node<1>", "dog & co"):
        assert raw not in text
    assert "a&lt;b" in text and "dog &amp; co" in text and "Run &lt;report&gt; &amp; co" in text

    # every image is an inlined PNG that PIL opens, and equals the file under figures/
    assert len(reader.sources) == 5  # bar chart, CAM curve, every run's loss, the validated runs overlaid, gallery
    figure_files = {p.read_bytes() for p in (tmp_path / "figures").glob("*.png")}
    assert len(figure_files) == 5
    for src in reader.sources:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        with Image.open(io.BytesIO(png)) as img:
            img.verify()
            assert img.format == "PNG"
        assert png in figure_files
    without_data = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)
    assert "http" not in without_data.lower() and "<script" not in without_data.lower()
    assert all(link.startswith("#") for link in reader.links)

    # header facts: compute time, versions, provenance and config tables
    total = sum(p["seconds"] for p in inputs.provenance.values())
    assert f"{total:.1f} s" in text
    assert "torch 2.13.0" in text
    provenance_table = next(t for t in reader.tables if t[0][:2] == ["stage", "key"])
    assert [row[4] for row in provenance_table[1:]] == [p["code_digest"] for p in inputs.provenance.values()]
    knob_rows = [row for t in reader.tables if t[0] == ["knob", "value"] for row in t[1:]]
    assert ["lr", "0.1"] in knob_rows and ["pretrained", '""'] in knob_rows
    assert ["sweep", "[0.05, 0.5, 0.05]"] in knob_rows
    assert text.count("<details>") == 3  # two config sections + provenance

    # Markdown: the headline and per-class tables and the config keys
    md = md_path.read_text(encoding="utf-8")
    assert f"| DeepLab / ceiling | {100 * ratio:.1f}% |" in md
    assert f"| a\\<b | {pct(cam['per_class_iou']['a<b'])} |" in md  # '<' escaped: not read as an HTML tag
    assert f"| Pseudo labels (before CRF) | {pct(pseudo['miou'])} |" in md
    assert "`num_epochs = 5`" in md and "[EvalCAM]" in md

    assert summary["cam_miou"] == cam["miou"] and summary["cam_best_threshold"] == cam["best_threshold"]
    assert summary["seed_miou"] == seeds["miou"] and summary["seed_precision"] == seeds["precision"]
    assert summary["seed_labelled_fraction"] == seeds["labelled_fraction"]
    assert summary["pseudo_miou"] == pseudo["miou"]
    assert summary["refined_miou"] == inputs.refined_metrics["miou"]
    assert summary["segmentation_miou"] == seg["miou"] and summary["ceiling_miou"] == ceiling["miou"]
    assert summary["segmentation_to_ceiling"] == pytest.approx(ratio)
    assert summary["compute_seconds"] == pytest.approx(total)
    assert summary["not_run"] == []

    # the same inputs give the same bytes (the date is pinned)
    again = write_report(inputs, tmp_path / "again")
    assert Path(again["html"]).read_bytes() == html_path.read_bytes()


def test_optional_stages_missing(tmp_path):
    inputs = make_inputs()
    inputs.refined_metrics = inputs.segmentation_metrics = inputs.ceiling_metrics = None
    inputs.training_curves, inputs.gallery, inputs.cam_curve, inputs.notes = {}, [], [], []
    inputs.cooccurrence = None
    summary = write_report(inputs, tmp_path)
    text, reader = read_html(tmp_path / "report.html")
    assert reader.headings == SECTION_TITLES
    headline = {row[0]: row for row in table_starting(reader, "stage")[1:]}
    for stage in ("Pseudo labels (after CRF)", "DeepLab on val", "Fully supervised ceiling", "DeepLab / ceiling"):
        assert headline[stage][1:] == ["-", "not run"]
    assert headline["Pseudo labels (before CRF)"][1] == pct(inputs.pseudo_metrics["miou"])
    for line in ("Not run: no CAM threshold sweep was given.", "Not run: no training curves were given.",
                 "Not run: no gallery images were given."):
        assert line in text
    assert len(table_starting(reader, "class")[0]) == 4  # class + CAM, seeds, pseudo
    assert len(reader.sources) == 1  # only the per-class bar chart is left
    assert summary["refined_miou"] is None and summary["segmentation_to_ceiling"] is None
    assert summary["not_run"] == ["CRF refinement", "DeepLab", "fully supervised ceiling", "CAM threshold sweep",
                                  "training curves", "gallery", "co-occurrence"]
    assert "| DeepLab / ceiling | - | not run |" in (tmp_path / "report.md").read_text()


def test_gallery_panels_resized_and_coloured():
    inputs = make_inputs()
    palette = inputs.palette
    kinds, rows = gallery_rows(inputs.gallery, palette)
    assert kinds == ["image", "cam", "seeds", "pseudo", "crf", "prediction", "gt"]
    (first_id, first), (_, second) = rows
    assert first_id == "img<0>" and "crf" not in second
    for panels in (first, second):
        assert all(panel.shape == (H, W, 3) and panel.dtype == np.uint8 for panel in panels.values())
    # nearest-neighbour upsizing: each seed pixel becomes a 2x2 block of exactly its palette colour
    seeds = inputs.gallery[0][1]["seeds"]
    np.testing.assert_array_equal(first["seeds"], palette[np.repeat(np.repeat(seeds, 2, 0), 2, 1)])
    # downsizing picks one of each 2x2 block's labels (no blended, off-palette colours)
    prediction = inputs.gallery[0][1]["prediction"]
    candidates = [palette[prediction[di::2, dj::2]] for di in (0, 1) for dj in (0, 1)]
    assert np.all(np.any([np.all(first["prediction"] == c, axis=-1) for c in candidates], axis=0))
    np.testing.assert_array_equal(first["gt"], palette[inputs.gallery[0][1]["gt"]])
    # the CAM overlay mixes image and heat map, so it differs from the image but follows it
    assert not np.array_equal(first["cam"], first["image"])


def test_bad_inputs_raise(tmp_path):
    inputs = make_inputs()
    inputs.palette = voc_palette()[:255]
    with pytest.raises(ValueError, match="palette"):
        write_report(inputs, tmp_path)
    inputs.palette = np.zeros((256, 4), np.uint8)
    with pytest.raises(ValueError, match="palette"):
        write_report(inputs, tmp_path)
    with pytest.raises(ValueError, match="img-x.*2-D"):
        gallery_rows([("img-x", {"gt": np.zeros((2, 3, 4), np.uint8)})], voc_palette())
    with pytest.raises(ValueError, match="unknown panels"):
        gallery_rows([("img-x", {"mask": np.zeros((3, 4), np.uint8)})], voc_palette())
    assert not (tmp_path / "report.html").exists()


def part_inputs(rng: np.random.Generator):
    from stages.report.html import PartsInputs

    names = ["background", "cat.head", "cat.body", "dog.head"]
    runs = []
    for entry, source, mode, lam in (("none/off", "none", "off", 0.1), ("gt/st/10", "gt", "st", 10.0)):
        iou = [float(v) for v in rng.uniform(0.2, 0.9, len(names))]
        iou[3] = None  # dog.head absent from val
        runs.append({"entry": entry, "cond_source": source, "gm_mode": mode, "gm_lambda": lam, "train_seconds": 75.0,
                     "metrics": {"miou": 0.5, "miou_no_bg": 0.4, "miou_identifiable": 0.45,
                                 "object_mean_part_iou_zero": 0.3, "object_mean_part_iou_present": 0.35,
                                 "object_miou": 0.6, "adjacency_error": 0.123456, "adjacency_error_per_image": 0.2,
                                 "cross_object_adjacency": 0.05, "iou": iou}})
    parts = label_map(rng, (H, W)) % len(names)
    gallery = [("val<1>", [("image", "image", rng.integers(0, 256, (H, W, 3), dtype=np.uint8)),
                           ("part GT", "parts", parts), ("objects (gt)", "objects", parts[::2, ::2] % 3),
                           ("parts: gt/st/10", "parts", parts)])]
    return PartsInputs(part_names=names, part_palette=voc_palette(), object_names=["background", "cat", "dog"],
                       object_palette=voc_palette(), runs=runs, gallery=gallery)


def test_parts_section_tables_every_run_and_draws_its_figures(tmp_path):
    from stages.report.html import parts_gallery_rows

    rng = np.random.default_rng(3)
    inputs = make_inputs()
    inputs.parts = part_inputs(rng)
    summary = write_report(inputs, tmp_path)
    text, reader = read_html(tmp_path / "report.html")
    assert reader.headings == [*SECTION_TITLES[:1], "Part segmentation (GMNet)", *SECTION_TITLES[1:]]
    assert 'href="#parts"' in text
    table = table_starting(reader, "run")
    assert table[1] == ["none/off", "none", "off", "-", "50.0", "40.0", "45.0", "30.0", "35.0", "60.0", "0.1235",
                        "0.2000", "5.0", "1 min 15 s"]
    assert table[2][:4] == ["gt/st/10", "gt", "st", "10"]
    per_part = table_starting(reader, "part")
    assert per_part[4] == ["dog.head", "-", "-"] and per_part[-1] == ["mean (part mIoU)", "50.0", "50.0"]
    assert {"part_iou.png", "parts_gallery.png"} <= set(summary["figures"])
    assert summary["parts"]["gt/st/10"] == {"miou": 0.5, "miou_identifiable": 0.45, "adjacency_error": 0.123456}
    titles, rows = parts_gallery_rows(inputs.parts)
    assert titles == ["image", "part GT", "objects (gt)", "parts: gt/st/10"]
    objects = rows[0][1]["objects (gt)"]   # half size, resized to the image's, in the object palette
    assert objects.shape == (H, W, 3)
    np.testing.assert_array_equal(objects[::2, ::2], voc_palette()[inputs.parts.gallery[0][1][2][2]])
    assert "## Part segmentation (GMNet)" in (tmp_path / "report.md").read_text()


def test_bad_parts_inputs_raise(tmp_path):
    from stages.report.html import parts_gallery_rows

    inputs = make_inputs()
    inputs.parts = part_inputs(np.random.default_rng(4))
    inputs.parts.runs[1]["metrics"]["iou"] = [0.5]
    with pytest.raises(ValueError, match="'gt/st/10': 1 per-part IoU values for 4 parts"):
        write_report(inputs, tmp_path)
    inputs.parts.gallery = [("val<1>", [("masks", "mask", np.zeros((3, 4), np.uint8))])]
    with pytest.raises(ValueError, match="kind must be image, objects or parts"):
        parts_gallery_rows(inputs.parts)
    assert not (tmp_path / "report.html").exists()


# ------------------------------------------------------------------------------- what a reader sees (issue 21)

def test_figure_colours_stay_apart_under_colour_vision_deficiencies():
    from stages.report.colours import figure_palette, min_distance

    for n in (11, 21, 59):  # the embedded set's 11 labels, VOC's 21, Pascal-Part-58 with background
        palette = figure_palette(n)
        colours = np.vstack([palette[:n], palette[255:]])
        assert tuple(palette[0]) == (0, 0, 0) and tuple(palette[255]) == (255, 255, 255)
        assert len({tuple(c) for c in colours}) == n + 1
        voc = np.vstack([voc_palette()[:n], voc_palette()[255:]])
        # VOC's palette puts two labels at ΔE ~1 for some reader; ours keeps every pair apart for every reader
        assert min_distance(voc) < 3 and min_distance(colours) > {11: 20, 21: 15, 59: 8}[n]
        np.testing.assert_array_equal(figure_palette(n), palette)  # deterministic


def test_report_draws_labels_in_the_figure_palette_and_keeps_the_png_palette(tmp_path):
    from stages.report.colours import figure_palette

    inputs = make_inputs()
    write_report(inputs, tmp_path)
    text = (tmp_path / "report.html").read_text()
    legend = re.search(r"Colours: (.*?)</p>", text).group(1)
    shown = [tuple(int(v) for v in m) for m in re.findall(r"rgb\((\d+),(\d+),(\d+)\)", legend)]
    palette = figure_palette(len(NAMES))
    assert shown == [tuple(int(v) for v in palette[i]) for i in [*range(len(NAMES)), 255]]
    assert "label PNGs on disk keep" in text and "DeepLab (train image)" in text


def test_seed_bars_say_they_score_labelled_pixels_only(tmp_path):
    write_report(make_inputs(), tmp_path)
    _, reader = read_html(tmp_path / "report.html")
    assert table_starting(reader, "class")[0][2] == "Seeds (labelled pixels only)"


def comparison_row(method: str, trainer: str) -> dict:
    return {"method": method, "recipe": "configs/demo.cfg", "crf_preset": "a2gnn_final", "trainer": trainer,
            "cam_miou": 0.39, "seed_miou": 0.71, "pseudo_label_miou": 0.46, "refined_miou": 0.54,
            "deeplab_miou": 0.48, "ceiling_miou": 0.57, "train_seconds": 200.0, "propagate_seconds": 10.0,
            "propagated_images": 100}


def test_methods_table_only_when_a_method_is_compared(tmp_path):
    inputs = make_inputs()
    inputs.comparison = [comparison_row("rw_irn/image (main chain)", "TrainAffinity")]
    write_report(inputs, tmp_path / "alone")
    _, reader = read_html(tmp_path / "alone" / "report.html")
    assert "Propagation methods compared" not in reader.headings
    assert "Propagation methods compared" not in (tmp_path / "alone" / "report.md").read_text()
    inputs.comparison.append(comparison_row("demo_psa.cfg", "TrainAffinity@seed_method=psa,lr=0.02,num_epochs=5"))
    write_report(inputs, tmp_path / "two")
    _, reader = read_html(tmp_path / "two" / "report.html")
    assert "Propagation methods compared" in reader.headings
    table = table_starting(reader, "method")
    assert [row[-1] for row in table[1:]] == ["TrainAffinity", "TrainAffinity (own variant)"]


def test_every_trained_stage_gets_a_training_curve(tmp_path):
    rng = np.random.default_rng(5)
    inputs = make_inputs()
    no_val = [{k: v for k, v in row.items() if k != "val_miou"} for row in training_rows(rng, 3, 4)]
    inputs.training_curves = {"PretrainBackbone": no_val, "TrainCAM": no_val, "TrainAffinity": no_val,
                              "DeepLab on pseudo labels": training_rows(rng, 3, 4)}
    summary = write_report(inputs, tmp_path)
    _, reader = read_html(tmp_path / "report.html")
    table = table_starting(reader, "run")
    assert [row[0] for row in table[1:]] == list(inputs.training_curves)
    assert {"training_losses.png", "training_validation.png"} <= set(summary["figures"])
    last = inputs.training_curves["DeepLab on pseudo labels"][-1]
    assert table[-1][5:7] == [f"{100 * last['val_miou']:.1f}", f"{100 * last['train_miou']:.1f}"]
    assert table[1][5:7] == ["-", "-"]                       # no val, no train score: the pretraining


def test_the_headline_gives_each_deeplabs_train_and_val_fit(tmp_path):
    rng = np.random.default_rng(6)
    inputs = make_inputs()
    inputs.training_curves = {"DeepLab on GT (ceiling)": training_rows(rng, 2, 3)}
    write_report(inputs, tmp_path)
    _, reader = read_html(tmp_path / "report.html")
    rows = {row[0]: row for row in table_starting(reader, "stage")[1:]}
    last = inputs.training_curves["DeepLab on GT (ceiling)"][-1]
    assert f"train {100 * last['train_miou']:.1f} (its training labels), val {100 * last['val_miou']:.1f}" in \
        rows["Fully supervised ceiling"][2]
    assert "train" not in rows["DeepLab on val"][2]            # its run logged nothing here


@pytest.mark.parametrize(("vals", "verdict"), [
    ((0.30, 0.40, 0.45, 0.455), "+0.5 in the last 25% of training: converged"),
    ((0.30, 0.40, 0.45, 0.48), "+3.0 in the last 25% of training: still rising"),
    ((0.30, 0.40, 0.46, 0.45), "-1.0 in the last 25% of training: converged"),
    ((0.30, 0.46, 0.40, 0.465), "+0.5 in the last 25% of training: converged"),     # over the best, not the dip
])
def test_the_ceiling_s_fit_says_whether_val_still_rose_at_the_end(tmp_path, vals, verdict):
    rows = [{"epoch": k + 1, "iteration": 100 * (k + 1), "loss": 1.0, "lr": 0.01, "val_miou": v,
             "train_miou": 0.6, "seconds": k} for k, v in enumerate(vals)]
    inputs = make_inputs()
    inputs.training_curves = {"DeepLab on GT (ceiling)": rows}
    write_report(inputs, tmp_path)
    _, reader = read_html(tmp_path / "report.html")
    assert verdict in {row[0]: row for row in table_starting(reader, "stage")[1:]}["Fully supervised ceiling"][2]


@pytest.mark.parametrize(("dataset", "root", "title"), [
    ({"kind": "synthetic", "profile": "large"}, "/w/PrepareDataset/k/data", "synthetic large"),
    ({"kind": "voc", "profile": "demo", "root": "/data/anchors_voc"}, "/data/anchors_voc", "anchors_voc"),
])
def test_the_title_names_the_dataset(dataset, root, title):
    from types import SimpleNamespace

    from stages.report.build import dataset_name

    assert dataset_name(dataset, SimpleNamespace(root=Path(root))) == title


def test_fitted_knobs_and_scale_warnings_are_shown(tmp_path):
    inputs = make_inputs()
    write_report(inputs, tmp_path / "none")
    assert "fitted to the data" not in (tmp_path / "none" / "report.html").read_text()
    inputs.provenance["Propagate"] = {
        "stage": "Propagate", "key": "p-1", "seconds": 1.0,
        "fitted": {"knobs": {"steps": {"value": 32, "set": "auto", "rule": "256 steps x grid area 4800 / 11750"}},
                   "warnings": ["Propagate.gcn_walk_steps = 4 is 8x below what `auto` chooses"]}}
    write_report(inputs, tmp_path / "fitted")
    _, reader = read_html(tmp_path / "fitted" / "report.html")
    table = next(t for t in reader.tables if t and t[0][:2] == ["stage", "knob"])
    assert table[1] == ["Propagate", "steps", "auto", "32", "256 steps x grid area 4800 / 11750"]
    html = (tmp_path / "fitted" / "report.html").read_text()
    assert 'class="flag">Propagate: Propagate.gcn_walk_steps = 4 is 8x below' in html
    markdown = (tmp_path / "fitted" / "report.md").read_text()
    assert "| Propagate | steps | auto | 32 |" in markdown and "gcn_walk_steps = 4 is 8x below" in markdown


def test_the_summary_says_whether_a_deeplab_s_val_still_rose(tmp_path):
    from data.artifacts import TRAINING_LOG
    from data.io import write_csv
    from pipeline.cli import val_trend
    assert val_trend(tmp_path) == ""                            # no log: nothing said
    write_csv(tmp_path / TRAINING_LOG, [{"iteration": 100 * k, "val_miou": v, "train_miou": ""}
                                        for k, v in ((1, 0.2), (2, 0.3), (3, 0.35), (4, 0.40))])
    assert val_trend(tmp_path) == " (val +5.0 in the last 25% of training: still rising: longer training may help)"

"""The report's co-occurrence flag: shares on hand-made label maps, the context tally, the threshold, the table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_report import make_inputs, read_html

from data.io import BadInputError, write_label_png
from data.labelspace import LabelSpace, voc_palette
from data.manifest import Manifest
from stages.config import ReportConfig, validate
from stages.report.cooccurrence import (
    CLASS_CONTEXT,
    SCENE_CONTEXT,
    CooccurrenceTally,
    joint_counts,
    measure_cooccurrence,
)
from stages.report.html import write_report

NAMES = ["background", "boat", "car", "tree"]
X = 255

# Two eval images, worked out by hand in the comments of the tests below.
GT_WATER = np.array([[0, 0, 0, 0],
                     [1, 1, 0, X],
                     [2, 2, 0, 0]], np.uint8)
LABELS_WATER = np.array([[1, 1, 1, 0],
                         [1, X, 0, 1],      # boat's second GT pixel unlabelled; a boat label on GT 255
                         [2, 0, 2, 0]], np.uint8)
GT_GRASS = np.array([[0, 0], [3, 3]], np.uint8)
LABELS_GRASS = np.array([[1, 3], [3, 3]], np.uint8)
GT_VAL = np.array([[0, 0, 0, 0], [0, 1, X, X]], np.uint8)
PRED_VAL = np.array([[1, 1, 0, X], [2, 1, 1, 1]], np.uint8)


def tally(scenes: tuple[str | None, str | None] = ("water", "grass"), val: bool = True) -> CooccurrenceTally:
    counts = CooccurrenceTally(NAMES)
    counts.add(GT_WATER, LABELS_WATER, scenes[0])
    counts.add(GT_GRASS, LABELS_GRASS, scenes[1])
    if val:
        counts.add_val(GT_VAL, PRED_VAL)
    return counts


def by_name(result) -> dict:
    return {row.name: row for row in result.classes}


def test_joint_counts_leave_out_gt_ignore_and_count_unlabelled_apart():
    counts = joint_counts(GT_WATER, LABELS_WATER, len(NAMES))
    assert counts.shape == (4, 5) and counts.sum() == GT_WATER.size - 1   # one GT 255 pixel left out
    assert counts[0, 1] == 3 and counts[1, 1] == 1 and counts[1, 4] == 1  # boat on bg; boat; boat unlabelled
    assert counts[2, 2] == 1 and counts[2, 0] == 1 and counts[0, 2] == 1
    with pytest.raises(ValueError, match="GT is"):
        joint_counts(GT_WATER, LABELS_GRASS, len(NAMES))
    with pytest.raises(ValueError, match="GT value 7"):
        joint_counts(np.full((2, 2), 7, np.uint8), LABELS_GRASS, len(NAMES))


def test_shares_on_hand_made_maps():
    rows = by_name(tally().result(threshold=0.5))
    assert list(rows) == NAMES[1:]
    # boat: labelled at 4 + 1 non-ignored pixels, 3 + 1 of them GT background; 1 of its 2 GT pixels labelled boat
    assert rows["boat"].labelled == 5
    assert rows["boat"].on_background == pytest.approx(4 / 5) and rows["boat"].recall == pytest.approx(1 / 2)
    # car: 2 labelled, 1 on background; 1 of 2 GT car pixels; tree: 3 labelled, 1 on background, all GT tree found
    assert rows["car"].on_background == pytest.approx(1 / 2) and rows["car"].recall == pytest.approx(1 / 2)
    assert rows["tree"].on_background == pytest.approx(1 / 3) and rows["tree"].recall == pytest.approx(1.0)
    # val: 5 GT-background pixels predicted boat, boat, background, unlabelled, car
    assert rows["boat"].val_background_painted == pytest.approx(2 / 5)
    assert rows["car"].val_background_painted == pytest.approx(1 / 5)
    assert rows["tree"].val_background_painted == 0.0


def test_scene_tally_names_the_top_scene_and_its_share():
    result = tally().result(threshold=0.5)
    rows = by_name(result)
    assert result.context_kind == SCENE_CONTEXT and result.images == 2 and result.val_images == 1
    # boat's 4 background pixels: 3 in the water image, 1 in the grass image
    assert (rows["boat"].context, rows["boat"].context_share) == ("water", pytest.approx(3 / 4))
    assert (rows["car"].context, rows["car"].context_share) == ("water", 1.0)
    assert (rows["tree"].context, rows["tree"].context_share) == ("grass", 1.0)


def test_without_scenes_the_context_is_the_co_occurring_gt_class():
    result = tally(scenes=(None, None)).result(threshold=0.5)
    rows = by_name(result)
    assert result.context_kind == CLASS_CONTEXT
    # boat spills 3 pixels in the image with GT car (and boat: never its own context), 1 in the one with GT tree
    assert (rows["boat"].context, rows["boat"].context_share) == ("car", pytest.approx(3 / 4))
    assert (rows["car"].context, rows["car"].context_share) == ("boat", 1.0)
    # tree spills only in an image where it is the only GT class: no context
    assert rows["tree"].context is None and rows["tree"].context_share is None


def test_flag_threshold_is_inclusive_and_validated():
    assert tally().result(threshold=0.5).flagged == ["boat", "car"]       # 0.8 and exactly 0.5
    assert tally().result(threshold=0.6).flagged == ["boat"]
    assert tally().result(threshold=1.0).flagged == []
    empty = CooccurrenceTally(NAMES).result(threshold=0.01)               # no pixels: undefined, never flagged
    assert empty.flagged == [] and all(row.on_background is None and row.recall is None for row in empty.classes)
    assert all(row.val_background_painted is None for row in empty.classes)
    validate(ReportConfig(cooccurrence_flag=1.0))
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="cooccurrence_flag"):
            validate(ReportConfig(cooccurrence_flag=bad))


def test_rendered_table_highlights_flagged_rows(tmp_path):
    inputs = make_inputs()
    inputs.cooccurrence = tally().result(threshold=0.6)
    summary = write_report(inputs, tmp_path)
    text, reader = read_html(tmp_path / "report.html")
    assert reader.headings.index("Co-occurrence") == reader.headings.index("Per-class IoU") + 1
    assert 'href="#cooccurrence"' in text
    table = next(t for t in reader.tables if t[0][:2] == ["class", "pseudo-label pixels on GT background (%)"])
    assert table[0][3] == "top background scene (share)"
    assert table[1:] == [["boat", "80.0", "50.0", "water (75.0%)", "40.0", "yes"],
                         ["car", "50.0", "50.0", "water (100.0%)", "20.0", ""],
                         ["tree", "33.3", "100.0", "grass (100.0%)", "0.0", ""]]
    assert text.count('<tr class="flagged">') == 1 and "tr.flagged td" in text
    line = "Co-occurrence flag: boat (80.0% on GT background, mostly water): this class learned its context"
    assert line in text and text.count(line) == 2   # under the headline and in the section
    md = (tmp_path / "report.md").read_text()
    assert line in md and "## Co-occurrence" in md
    assert "| boat | 80.0 | 50.0 | water (75.0%) | 40.0 | yes |" in md
    assert summary["cooccurrence_flagged"] == ["boat"] and summary["not_run"] == []
    assert summary["cooccurrence_on_background"]["tree"] == pytest.approx(1 / 3)


def test_section_says_not_run_without_pseudo_labels(tmp_path):
    inputs = make_inputs()
    inputs.cooccurrence = None
    summary = write_report(inputs, tmp_path)
    text, reader = read_html(tmp_path / "report.html")
    assert "Co-occurrence" in reader.headings
    assert "Not run: the final pseudo labels were not given." in text and "Co-occurrence flag" not in text
    assert "co-occurrence" in summary["not_run"] and summary["cooccurrence_flagged"] == []
    assert "Not run: the final pseudo labels were not given." in (tmp_path / "report.md").read_text()


def test_no_flag_says_so(tmp_path):
    inputs = make_inputs()
    inputs.cooccurrence = tally().result(threshold=0.9)
    write_report(inputs, tmp_path)
    text = (tmp_path / "report.html").read_text()
    assert "Co-occurrence flag: no class has 90.0% or more" in text and '<tr class="flagged">' not in text
    assert '<p class="flag">' not in text


# --------------------------------------------------------------------------------------- from the files

def voc_dataset(root: Path, scenes: bool) -> Manifest:
    space = LabelSpace(tuple(NAMES))
    images = {"a": (GT_WATER, "water"), "b": (GT_GRASS, "grass"), "v": (GT_VAL, "sand")}
    (root / "Annotations").mkdir(parents=True)
    for image_id, (gt, scene) in images.items():
        write_label_png(root / "SegmentationClass" / f"{image_id}.png", gt, voc_palette())
        scene_xml = f"<scene>{scene}</scene>" if scenes else ""
        (root / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{scene_xml}</annotation>")
    return Manifest(root=root, label_space=space, splits={"train": ["a", "b"], "eval": ["a", "b"], "val": ["v"]},
                    image_labels={"a": [1, 2], "b": [3], "v": [1]})


def stage_dir(path: Path, labels: dict[str, np.ndarray]) -> Path:
    for image_id, array in labels.items():
        write_label_png(path / "labels" / f"{image_id}.png", array, voc_palette())
    return path


@pytest.mark.parametrize(("scenes", "kind", "boat_context"), [(True, SCENE_CONTEXT, "water"),
                                                               (False, CLASS_CONTEXT, "car")])
def test_measured_from_the_run_files(tmp_path, scenes, kind, boat_context):
    manifest = voc_dataset(tmp_path / "voc", scenes)
    labels = stage_dir(tmp_path / "RefineCRF", {"a": LABELS_WATER, "b": LABELS_GRASS})
    predictions = stage_dir(tmp_path / "EvalSegmentation", {"v": PRED_VAL})
    result = measure_cooccurrence(manifest, labels, 0.5, predictions)
    boat = by_name(result)["boat"]
    assert result.context_kind == kind and boat.context == boat_context and result.flagged == ["boat", "car"]
    assert boat.on_background == pytest.approx(0.8) and boat.val_background_painted == pytest.approx(0.4)
    # no val predictions: that column undefined; no pseudo labels at all: not measured
    alone = measure_cooccurrence(manifest, labels, 0.5, tmp_path / "missing")
    assert alone.val_images == 0 and by_name(alone)["boat"].val_background_painted is None
    assert measure_cooccurrence(manifest, tmp_path / "missing", 0.5) is None


def test_bad_files_name_themselves(tmp_path):
    manifest = voc_dataset(tmp_path / "voc", scenes=True)
    labels = stage_dir(tmp_path / "RefineCRF", {"a": LABELS_WATER, "b": LABELS_GRASS[:1]})  # wrong size
    with pytest.raises(BadInputError, match=r"b\.png.*2x2"):
        measure_cooccurrence(manifest, labels, 0.5)
    (tmp_path / "voc" / "Annotations" / "a.xml").write_text("<annotation><scene>")
    labels = stage_dir(tmp_path / "Propagate", {"a": LABELS_WATER, "b": LABELS_GRASS})
    with pytest.raises(BadInputError, match=r"a\.xml.*cannot parse"):
        measure_cooccurrence(manifest, labels, 0.5)


def test_summary_command_prints_the_flagged_classes():
    from pipeline.cli import cooccurrence_flag

    metrics = {"cooccurrence_flagged": ["boat"], "cooccurrence_on_background": {"boat": 0.8, "car": 0.5}}
    assert cooccurrence_flag(metrics) == ["Co-occurrence flag (report): boat (80.0% of its pseudo-label pixels on GT "
                                          "background)"]
    assert cooccurrence_flag({"cooccurrence_flagged": []}) == ["Co-occurrence flag (report): no class"]
    assert cooccurrence_flag({"miou": 0.5}) == []   # a report from before the measure


def test_the_labels_measured_are_those_deeplab_trained_on():
    from stages.config import TrainSegmentationConfig
    from stages.report.build import final_labels_dir

    dirs = {"labels": Path("Propagate/k"), "refined": Path("RefineCRF/k")}
    assert final_labels_dir(dirs, TrainSegmentationConfig(pseudo_labels="crf")) == dirs["refined"]
    assert final_labels_dir(dirs, TrainSegmentationConfig(pseudo_labels="propagated")) == dirs["labels"]
    # agreed trains on the CRF's labels with the pixels the CRF changed ignored: those labels, less some pixels
    assert final_labels_dir(dirs, TrainSegmentationConfig(pseudo_labels="agreed")) == dirs["refined"]

"""Point / scribble / box supervision: annotation readers, SLIC, the merge rules, the stage hook, seed quality."""

from __future__ import annotations

import dataclasses
import shutil

import cv2
import numpy as np
import pytest
from scipy import ndimage

from data.artifacts import label_file
from data.dense import DenseMapReader, DenseMapWriter
from data.io import BadInputError, read_label_png, write_label_png
from data.labelspace import IGNORE_INDEX, LabelSpace
from data.synthetic import PROFILES, render_sample
from data.voc import VOCLayout
from pipeline.checks import validate_config as validate
from stages.config import ExtractSeedsConfig
from stages.seeds.extract import extract_seeds
from stages.seeds.rules import SEED_METHODS, SeedQuality
from stages.seeds.supervision import (
    box_seeds,
    grow_scribbles,
    merge_supervision,
    point_seeds,
    scribble_seeds,
    slic_superpixels,
    supervision_boxes,
)


def standin_cams(gt: np.ndarray, keys: list[int], rng: np.random.Generator) -> np.ndarray:
    """CAM stand-ins: each class's GT mask peaked towards its core, blurred, shifted a little, plus a blob leaking
    into the background (co-occurring context) and a little noise; each plane normalised to max 1."""
    h, w = gt.shape
    sigma = 0.06 * min(h, w)
    yy, xx = np.mgrid[0:h, 0:w]
    planes = []
    for c in keys:
        mask = (gt == c).astype(np.uint8)
        dist = cv2.distanceTransform(mask, cv2.DIST_L2, 3)
        cam = cv2.GaussianBlur(mask * np.sqrt(dist / max(dist.max(), 1e-6)), (0, 0), sigma)
        cam = cam / max(cam.max(), 1e-6)
        ys, xs = np.nonzero(gt == 0)
        j = rng.integers(len(ys))
        cam = cam + rng.uniform(0.2, 0.6) * np.exp(-((yy - ys[j]) ** 2 + (xx - xs[j]) ** 2) / (18 * sigma ** 2))
        cam = np.roll(cam + 0.01 * rng.random((h, w)), tuple(rng.integers(-3, 4, 2)), (0, 1))
        planes.append(cam / cam.max())
    return np.clip(np.stack(planes), 0, 1).astype(np.float32)


@pytest.fixture
def layout_copy(tiny_dataset, tmp_path):
    """A private copy of the tiny dataset's annotations (images, XML, points, scribbles) to corrupt."""
    root = tmp_path / "ds"
    for sub in ("JPEGImages", "Annotations", "Points", "Scribbles"):
        shutil.copytree(tiny_dataset / sub, root / sub)
    return VOCLayout(root, LabelSpace.load(tiny_dataset / "labelspace.json"))


def tiny_layout(tiny_dataset) -> VOCLayout:
    return VOCLayout(tiny_dataset, LabelSpace.load(tiny_dataset / "labelspace.json"))


# ---------------------------------------------------------------------------------------------- readers

def test_readers_on_tiny_dataset(tiny_dataset):
    layout = tiny_layout(tiny_dataset)
    ids = (tiny_dataset / "ImageSets/Segmentation/train.txt").read_text().split()
    for image_id in ids[:8]:
        gt = layout.read_label(image_id)
        h, w = gt.shape
        present = {int(c) for c in np.unique(gt) if 0 < c < IGNORE_INDEX}

        points = layout.read_points(image_id)
        assert all(0 <= x < w and 0 <= y < h for _, x, y in points)
        assert {label for label, _, _ in points if label} == present  # one click per object
        assert any(label == 0 for label, _, _ in points)               # background clicks too
        for label, x, y in points:
            assert gt[y, x] in (label, IGNORE_INDEX)

        scribble = layout.read_scribble(image_id)
        assert scribble.shape == (h, w) and scribble.dtype == np.uint8
        stroked = scribble != IGNORE_INDEX
        assert stroked.any() and np.all((gt[stroked] == scribble[stroked]) | (gt[stroked] == IGNORE_INDEX))

        boxes = layout.read_boxes(image_id)
        assert boxes.dtype == np.int64 and boxes.shape[1] == 5
        assert set(boxes[:, 0].tolist()) == present
        np.testing.assert_array_equal(boxes, layout.read_boxes(image_id, (h, w)))
        np.testing.assert_array_equal(boxes, supervision_boxes(layout, image_id, (h, w)))
        for c in present:  # every GT pixel of a class lies in one of its boxes
            inside = np.zeros((h, w), bool)
            for _, x0, y0, x1, y1 in boxes[boxes[:, 0] == c]:
                inside[y0:y1 + 1, x0:x1 + 1] = True
            assert inside[gt == c].all()
    # 0-based and inclusive: exactly the generator's boxes around each object's visible mask
    sample = render_sample(0, "train", 5, PROFILES["tiny"])
    expected = [[obj.cls + 1, *obj.box] for obj in sample.objects]
    np.testing.assert_array_equal(layout.read_boxes(ids[5]), expected)
    for (_, x0, y0, x1, y1), obj in zip(expected, sample.objects):
        ys, xs = np.nonzero(obj.mask)
        assert (xs.min(), ys.min(), xs.max(), ys.max()) == (x0, y0, x1, y1)


def _xml(objects: str, size: str = "<size><width>80</width><height>64</height><depth>3</depth></size>") -> str:
    return f"<annotation>{size}{objects}</annotation>"


def _obj(name: str, box: tuple) -> str:
    tags = "".join(f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
    return f"<object><name>{name}</name><bndbox>{tags}</bndbox></object>"


def test_read_boxes_converts_one_based_and_clips(layout_copy):
    image_id = "syn_000000"
    path = layout_copy.xml_path(image_id)
    path.write_text(_xml(_obj("disc", (1, 1, 10, 20)) + _obj("ring", (70.6, 30, 200, 64))))
    np.testing.assert_array_equal(layout_copy.read_boxes(image_id),
                                  [[1, 0, 0, 9, 19], [2, 70, 29, 79, 63]])
    # no <size>: taken from the image header (the tiny images are 80 x 64 too)
    path.write_text(_xml(_obj("ring", (5, 5, 500, 500)), size=""))
    np.testing.assert_array_equal(layout_copy.read_boxes(image_id), [[2, 4, 4, 79, 63]])
    path.write_text(_xml(""))
    assert layout_copy.read_boxes(image_id).shape == (0, 5)


@pytest.mark.parametrize("content, message", [
    (_xml(_obj("unicorn", (1, 1, 5, 5))), "not in the label space"),
    (_xml(_obj("background", (1, 1, 5, 5))), "not in the label space"),
    (_xml("<object><name>disc</name></object>"), "no <bndbox>"),
    (_xml(_obj("disc", ("a", 1, 5, 5))), "numeric"),
    (_xml(_obj("disc", (9, 1, 5, 5))), "before its min corner"),
    (_xml(_obj("disc", (100, 1, 120, 5))), "outside the 80x64 image"),
    ("<annotation><object>", "cannot parse XML"),
])
def test_read_boxes_rejects_malformed_xml_naming_the_file(layout_copy, content, message):
    path = layout_copy.xml_path("syn_000000")
    path.write_text(content)
    with pytest.raises(BadInputError, match=message) as err:
        layout_copy.read_boxes("syn_000000")
    assert str(path) in str(err.value)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"class": "disc"}', "expected a list"),
    ('[{"class": "disc", "x": 3}]', "'class', 'x' and 'y'"),
    ('[{"class": "unicorn", "x": 3, "y": 4}]', "not in the label space"),
    ('[{"class": "disc", "x": -1, "y": 4}]', "non-negative integers"),
    ('[{"class": "disc", "x": 1.5, "y": 4}]', "non-negative integers"),
])
def test_read_points_rejects_malformed_files_naming_the_file(layout_copy, content, message):
    path = layout_copy.points_path("syn_000000")
    path.write_text(content)
    with pytest.raises(BadInputError, match=message) as err:
        layout_copy.read_points("syn_000000")
    assert str(path) in str(err.value)


def test_missing_and_bad_annotation_files_name_the_file(layout_copy):
    image_id = "syn_000001"
    for path, read in ((layout_copy.points_path(image_id), layout_copy.read_points),
                       (layout_copy.scribble_path(image_id), layout_copy.read_scribble),
                       (layout_copy.xml_path(image_id), layout_copy.read_boxes)):
        path.unlink()
        with pytest.raises(BadInputError, match="missing") as err:
            read(image_id)
        assert str(path) in str(err.value)
    bad = np.full((64, 80), IGNORE_INDEX, np.uint8)
    bad[3, 3] = 77  # not a class of the 11-class label space
    write_label_png(layout_copy.scribble_path(image_id), bad, layout_copy.label_space.palette)
    with pytest.raises(BadInputError, match="outside the label space") as err:
        layout_copy.read_scribble(image_id)
    assert str(layout_copy.scribble_path(image_id)) in str(err.value)


# ------------------------------------------------------------------------------------------------- SLIC

def blocks_image(h: int = 60, w: int = 90, noise: float = 6.0) -> np.ndarray:
    """Three vertical colour bands with sensor noise."""
    rgb = np.zeros((h, w, 3), np.float32)
    rgb[:, : w // 3] = (200, 40, 40)
    rgb[:, w // 3: 2 * w // 3] = (40, 160, 60)
    rgb[:, 2 * w // 3:] = (50, 60, 200)
    rgb += np.random.default_rng(0).normal(0, noise, rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def test_slic_is_deterministic_connected_and_near_the_requested_count():
    rgb = blocks_image()
    for n_segments in (12, 60):
        segments = slic_superpixels(rgb, n_segments)
        assert segments.dtype == np.int32 and segments.shape == rgb.shape[:2]
        np.testing.assert_array_equal(segments, slic_superpixels(rgb, n_segments))
        count = segments.max() + 1
        assert np.array_equal(np.unique(segments), np.arange(count))  # ids 0..n-1
        assert 0.6 * n_segments <= count <= 1.4 * n_segments, count
        for k in range(count):
            assert ndimage.label(segments == k)[1] == 1  # 4-connected
    assert slic_superpixels(rgb, 1).max() == 0


def test_slic_follows_colour_edges():
    rgb = blocks_image()
    segments = slic_superpixels(rgb, 40)
    band = np.zeros(rgb.shape[:2], np.int64)
    band[:, 30:60], band[:, 60:] = 1, 2
    # each segment lies (almost) within one colour band
    pure = [np.bincount(band[segments == k], minlength=3).max() / (segments == k).sum()
            for k in range(segments.max() + 1)]
    assert min(pure) > 0.9, min(pure)


@pytest.mark.parametrize("kwargs, message", [
    ({"n_segments": 0}, "n_segments"), ({"compactness": 0}, "compactness"), ({"iterations": 0}, "iterations"),
])
def test_slic_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        slic_superpixels(blocks_image(), **kwargs)
    with pytest.raises(ValueError, match="uint8"):
        slic_superpixels(np.zeros((5, 5, 3), np.float32))


# ----------------------------------------------------------------------------------------------- points

def quadrant_superpixels(h: int = 20, w: int = 20) -> np.ndarray:
    segments = np.zeros((h, w), np.int32)
    segments[:, w // 2:] += 1
    segments[h // 2:, :] += 2
    return segments


def test_point_stamps_superpixel_and_annotation_wins():
    cam_seeds = np.full((20, 20), IGNORE_INDEX, np.uint8)
    cam_seeds[0:5, 0:5] = 2      # CAM says class 2 where the click says 1: annotation wins
    cam_seeds[12:18, 12:18] = 3  # CAM foreground of a class nobody clicked: kept
    out = point_seeds(cam_seeds, [(1, 3, 3), (0, 15, 2)], "superpixel", superpixels=quadrant_superpixels())
    assert out.dtype == np.uint8 and out.shape == (20, 20)
    assert (out[:10, :10] == 1).all() and (out[:10, 10:] == 0).all()
    assert (out[12:18, 12:18] == 3).all()
    assert (out[10:, :10] == IGNORE_INDEX).all()


def test_point_disk_stamp_and_conflicting_clicks():
    cam_seeds = np.zeros((20, 20), np.uint8)
    out = point_seeds(cam_seeds, [(1, 5, 10), (2, 9, 10)], "disk", radius=3)
    assert out[10, 5] == 1 and out[10, 9] == 2     # the clicks themselves stay certain
    assert out[10, 7] == IGNORE_INDEX                     # claimed by both disks
    assert out[10, 3] == 1 and out[10, 11] == 2 and out[10, 14] == 0
    assert out[10, 2] == 1 and out[10, 1] == 0      # radius 3
    # two classes in one superpixel: that superpixel goes to ignore, the clicked pixels keep their classes
    out = point_seeds(cam_seeds, [(1, 1, 1), (2, 8, 8)], "superpixel", superpixels=quadrant_superpixels())
    assert out[1, 1] == 1 and out[8, 8] == 2
    assert (out[:10, :10] == IGNORE_INDEX).sum() == 98 and (out[10:, 10:] == 0).all()
    # a pixel clicked with two classes is ignore
    out = point_seeds(cam_seeds, [(1, 4, 4), (2, 4, 4)], "disk", radius=0)
    assert out[4, 4] == IGNORE_INDEX


@pytest.mark.parametrize("points, kwargs, message", [
    ([(1, 20, 3)], {}, "outside"),
    ([(300, 2, 3)], {}, "label ids"),
    ([(1, 2, 3)], {"stamp": "superpixel"}, "needs a superpixel map"),
    ([(1, 2, 3)], {"stamp": "square"}, "point stamp"),
])
def test_point_seeds_reject_bad_input(points, kwargs, message):
    with pytest.raises(ValueError, match=message):
        point_seeds(np.zeros((20, 20), np.uint8), points, **{"stamp": "disk", **kwargs})


# -------------------------------------------------------------------------------------------- scribbles

def test_scribble_growth_over_superpixels_with_a_conflict():
    scribble = np.full((20, 20), IGNORE_INDEX, np.uint8)
    scribble[2, 1:6] = 4          # top-left: class 4 only
    scribble[15, 12:18] = 0       # bottom-right: background only
    scribble[3, 12:14] = 4        # top-right: class 4 and ...
    scribble[7, 15:17] = 5        # ... class 5: conflict
    grown = grow_scribbles(scribble, quadrant_superpixels())
    assert (grown[:10, :10] == 4).all() and (grown[10:, 10:] == 0).all()
    assert (grown[10:, :10] == IGNORE_INDEX).all()                       # untouched
    top_right = grown[:10, 10:]
    assert (top_right[scribble[:10, 10:] == IGNORE_INDEX] == IGNORE_INDEX).all()  # conflicting superpixel stays ignore
    assert (grown[3, 12:14] == 4).all() and (grown[7, 15:17] == 5).all()  # its strokes keep their labels

    cam_seeds = np.full((20, 20), 7, np.uint8)
    affinity, grown2 = scribble_seeds(cam_seeds, scribble, quadrant_superpixels())
    np.testing.assert_array_equal(grown2, grown)
    stroked = scribble != IGNORE_INDEX
    assert (affinity[stroked] == scribble[stroked]).all() and (affinity[~stroked] == 7).all()
    with pytest.raises(ValueError, match="differs from the image size"):
        scribble_seeds(cam_seeds, scribble[:10], quadrant_superpixels())


def test_scribble_growth_stays_inside_its_colour_region():
    rgb = blocks_image()
    scribble = np.full(rgb.shape[:2], IGNORE_INDEX, np.uint8)
    scribble[10:50, 15] = 1   # a vertical stroke in the red band
    scribble[30, 65:85] = 0   # a horizontal one in the blue band
    grown = grow_scribbles(scribble, slic_superpixels(rgb, 40))
    assert (grown == 1).sum() > 3 * (scribble == 1).sum()
    assert not (grown[:, 30:] == 1).any() and not (grown[:, :60] == 0).any()


# ------------------------------------------------------------------------------------------------ boxes

def box_scene(h: int = 60, w: int = 80):
    """Two untextured objects on a mid-grey background with noise: class 1 (red disc), class 2 (blue square)."""
    rng = np.random.default_rng(1)
    rgb = np.full((h, w, 3), 120, np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    disc = (yy - 25) ** 2 + (xx - 22) ** 2 <= 12 ** 2
    square = (yy >= 30) & (yy < 52) & (xx >= 48) & (xx < 72)
    rgb[disc] = (210, 40, 40)
    rgb[square] = (40, 60, 210)
    rgb = np.clip(rgb + rng.normal(0, 5, rgb.shape), 0, 255).astype(np.uint8)
    gt = np.zeros((h, w), np.uint8)
    gt[disc], gt[square] = 1, 2
    cam = np.stack([cv2.GaussianBlur(m.astype(np.float32), (0, 0), 4) for m in (disc, square)])
    cam /= cam.max(axis=(1, 2), keepdims=True)
    boxes = np.array([[1, 10, 13, 34, 37], [2, 48, 30, 71, 51]])
    return rgb, gt, cam, boxes


def test_box_outside_is_background_and_inside_follows_cam_and_grabcut():
    rgb, gt, cam, boxes = box_scene()
    cam_seeds = np.full(gt.shape, IGNORE_INDEX, np.uint8)
    cam_seeds[cam.max(0) < 0.3] = 0
    cam_seeds[cam[0] > 0.6] = 1
    cam_seeds[cam[1] > 0.6] = 2
    cam_seeds[0:6, 60:70] = 1  # a CAM seed of class 1 far outside every box: background
    out = box_seeds(rgb, cam_seeds, cam, [1, 2], boxes)
    assert out.dtype == np.uint8 and out.shape == gt.shape
    inside = np.zeros(gt.shape, bool)
    for _, x0, y0, x1, y1 in boxes:
        inside[y0:y1 + 1, x0:x1 + 1] = True
    assert (out[~inside] == 0).all()
    labelled = out != IGNORE_INDEX
    assert (out[labelled] == gt[labelled]).mean() > 0.99
    for c in (1, 2):
        assert ((out == c) & (gt == c)).sum() > 0.5 * (gt == c).sum()
    # the disc box's corners are background in GT; GrabCut and the CAM seeds agree there (most of them lie in
    # the ring, so look without it)
    no_ring = box_seeds(rgb, cam_seeds, cam, [1, 2], boxes, ring=0.0)
    corners = inside & (gt == 0) & (cam_seeds == 0)
    assert (no_ring[corners] == 0).mean() > 0.8
    assert (no_ring[no_ring != IGNORE_INDEX] == gt[no_ring != IGNORE_INDEX]).mean() > 0.99
    # ring of box 1 (25 px box, 5 % -> 2 px) stays ignore
    assert (out[13:15, 10:35] == IGNORE_INDEX).all()


def test_overlapping_boxes_smaller_box_wins():
    rgb, gt, cam, _ = box_scene()
    cam_seeds = np.full(gt.shape, IGNORE_INDEX, np.uint8)
    # a big class-1 box around everything and the tight class-2 box inside it
    boxes = np.array([[1, 5, 5, 75, 55], [2, 48, 30, 71, 51]])
    both = np.stack([np.maximum(cam[0], cam[1]), cam[1]])  # class 1's CAM is high on the square as well
    out = box_seeds(rgb, cam_seeds, both, [1, 2], boxes, ring=0.0)
    square = gt == 2
    assert not (out[square] == 1).any()              # class 1 never claims the small box's pixels
    assert ((out == 2) & square).sum() > 0.5 * square.sum()
    # the same pixels with the boxes' order swapped: same answer (area decides, not order)
    np.testing.assert_array_equal(out, box_seeds(rgb, cam_seeds, both, [1, 2], boxes[::-1], ring=0.0))


def test_whole_image_box_and_empty_cam_seeds():
    rgb, gt, cam, _ = box_scene()
    h, w = gt.shape
    empty = np.full(gt.shape, IGNORE_INDEX, np.uint8)
    out = box_seeds(rgb, empty, cam[:1], [1], np.array([[1, 0, 0, w - 1, h - 1]]), ring=0.0)
    disc = gt == 1
    assert ((out == 1) & disc).sum() > 0.5 * disc.sum()
    assert (out[out != IGNORE_INDEX] == np.where(gt == 2, 0, gt)[out != IGNORE_INDEX]).mean() > 0.97
    # empty CAM seeds and a CAM that is zero: nothing votes for the class, GrabCut alone only with threshold 0
    zero = np.zeros_like(cam[:1])
    boxes = np.array([[1, 10, 13, 34, 37]])
    assert not (box_seeds(rgb, empty, zero, [1], boxes) == 1).any()
    grabcut_only = box_seeds(rgb, empty, zero, [1], boxes, cam_threshold=0.0)
    assert ((grabcut_only == 1) & disc).sum() > 0.5 * disc.sum()
    # no boxes at all: everything is outside every box
    assert (box_seeds(rgb, empty, cam, [1, 2], np.zeros((0, 5), np.int64)) == 0).all()


def test_cam_foreground_in_a_box_of_another_class_becomes_ignore():
    rgb, gt, cam, boxes = box_scene()
    cam_seeds = np.zeros(gt.shape, np.uint8)
    cam_seeds[40:45, 55:60] = 1  # class 1 seeded inside the class-2 box, where no class-1 box is
    out = box_seeds(rgb, cam_seeds, cam, [1, 2], boxes)
    assert (out[40:45, 55:60] == IGNORE_INDEX).all()
    assert (out[35:50, 62:68] == 2).all()  # the rest of the square: CAM of class 2 and GrabCut agree
    # and with in-box background off, nothing inside the boxes becomes background
    out = box_seeds(rgb, np.zeros(gt.shape, np.uint8), cam, [1, 2], boxes, inside_background=False)
    for _, x0, y0, x1, y1 in boxes:
        assert not (out[y0:y1 + 1, x0:x1 + 1] == 0).any()


@pytest.mark.parametrize("change, message", [
    ({"boxes": np.array([[1, 0, 0, 80, 10]])}, "inside the 80x60 image"),
    ({"boxes": np.array([[0, 0, 0, 5, 5]])}, "foreground label ids"),
    ({"boxes": np.array([[1, 0, 0, 5]])}, r"\(M, 5\)"),
    ({"cam_threshold": 1.5}, "CAM threshold"),
    ({"ring": 0.5}, "ring"),
    ({"keys": [1]}, "CAM must be"),
])
def test_box_seeds_reject_bad_input(change, message):
    rgb, gt, cam, boxes = box_scene()
    args = {"rgb": rgb, "cam_seeds": np.zeros(gt.shape, np.uint8), "cam_high": cam, "keys": [1, 2],
            "boxes": boxes, **change}
    with pytest.raises(ValueError, match=message):
        box_seeds(**args)


# ----------------------------------------------------------------------------------------- config/stage

def test_config_validation_names_the_key():
    validate(ExtractSeedsConfig())
    validate(ExtractSeedsConfig(supervision="box"))
    for key, value in (("supervision", "clicks"), ("point_stamp", "star"), ("scribble_label", "both")):
        with pytest.raises(ValueError, match=key):
            validate(dataclasses.replace(ExtractSeedsConfig(), **{key: value}))
    # The supervision knobs are checked where their code runs: with supervision = point | scribble | box.
    for key, value in (("superpixels", 0), ("box_cam_threshold", 2.0), ("box_ring", 0.7), ("point_radius", -1)):
        validate(dataclasses.replace(ExtractSeedsConfig(), **{key: value}))
        with pytest.raises(ValueError, match=key):
            validate(dataclasses.replace(ExtractSeedsConfig(supervision="box"), **{key: value}))


def test_extract_seeds_stage_writes_grown_scribbles_and_the_affinity_map(tiny_manifest, tmp_path):
    layout = tiny_manifest.layout
    ids = tiny_manifest.splits["train"][:3]
    rng = np.random.default_rng(0)
    with DenseMapWriter(tmp_path / "cams.h5") as writer:
        for image_id in ids:
            gt = layout.read_label(image_id)
            keys = [int(k) for k in np.unique(gt) if 0 < k < IGNORE_INDEX]
            writer.write(image_id, {"high_res": standin_cams(gt, keys, rng)}, {"keys": np.asarray(keys, np.int32)})
    cfg = ExtractSeedsConfig(seed_method="irn", supervision="scribble")
    out = tmp_path / "seeds"
    with DenseMapWriter(tmp_path / "scores.h5") as scores:
        extract_seeds(cfg, tiny_manifest, ids, DenseMapReader([tmp_path / "cams.h5"]), out, scores)
    for image_id in ids:
        grown = read_label_png(label_file(out, image_id))
        affinity = read_label_png(label_file(out, image_id, folder="scribble_affinity"))
        scribble = layout.read_scribble(image_id)
        stroked = scribble != IGNORE_INDEX
        assert (grown[stroked] == scribble[stroked]).all() and (affinity[stroked] == scribble[stroked]).all()
        assert (grown != IGNORE_INDEX).sum() > stroked.sum()
    # an annotation file that is broken stops the stage with its name
    layout_root = tmp_path / "broken"
    shutil.copytree(tiny_manifest.root, layout_root)
    (layout_root / "Points" / f"{ids[0]}.json").write_text('[{"class": "disc", "x": 999, "y": 0}]')
    broken = dataclasses.replace(tiny_manifest, root=layout_root)
    point_cfg = dataclasses.replace(cfg, supervision="point")
    with DenseMapWriter(tmp_path / "scores2.h5") as scores, pytest.raises(BadInputError, match="outside") as err:
        extract_seeds(point_cfg, broken, ids, DenseMapReader([tmp_path / "cams.h5"]), tmp_path / "s2", scores)
    assert f"{ids[0]}.json" in str(err.value)


# ------------------------------------------------------------------------------------------ seed quality

def test_box_seeds_beat_image_level_seeds_on_tiny_dataset(tiny_manifest):
    """Measured on the tiny set with CAM stand-ins: boxes make seeds at least as precise and cover more."""
    layout, names = tiny_manifest.layout, tiny_manifest.label_space.names
    cfg = ExtractSeedsConfig(seed_method="irn")
    quality = {name: SeedQuality(len(names)) for name in ("image", "point", "scribble", "box")}
    rng = np.random.default_rng(0)
    for image_id in tiny_manifest.splits["train"]:
        rgb, gt = layout.read_image(image_id), layout.read_label(image_id)
        keys = [int(k) for k in np.unique(gt) if 0 < k < IGNORE_INDEX]
        cam = standin_cams(gt, keys, rng)
        seeds = SEED_METHODS.get("irn")(rgb, cam, keys, cfg).label
        for name, q in quality.items():
            merged = merge_supervision(dataclasses.replace(cfg, supervision=name), layout, image_id, rgb, cam,
                                       keys, seeds)
            q.add(merged.label, gt)
    summary = {name: q.summary(names) for name, q in quality.items()}
    image, box = summary["image"], summary["box"]
    assert box["precision"] >= image["precision"]
    assert box["labelled_fraction"] > image["labelled_fraction"]
    # clicks and scribbles only add correct labels to what they touch (the grown scribbles are nearly exact)
    assert summary["point"]["precision"] >= image["precision"] - 0.005
    assert summary["scribble"]["precision"] > 0.97

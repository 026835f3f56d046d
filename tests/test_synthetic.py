"""The embedded dataset: determinism, VOC layout, fairness properties, weak annotations."""

from __future__ import annotations

import json
from xml.etree import ElementTree

import numpy as np

from data.io import read_label_png
from data.synthetic import CLASSES, PROFILES, label_space, part_label_space, render_sample
from data.voc import VOCLayout, read_id_list


def test_render_is_deterministic():
    a = render_sample(3, "train", 5, PROFILES["tiny"])
    b = render_sample(3, "train", 5, PROFILES["tiny"])
    c = render_sample(3, "train", 6, PROFILES["tiny"])
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.semantic, b.semantic)
    assert not np.array_equal(a.image, c.image)


def test_voc_layout_and_annotations(tiny_dataset):
    root = tiny_dataset
    train = read_id_list(root / "ImageSets/Segmentation/train.txt")
    val = read_id_list(root / "ImageSets/Segmentation/val.txt")
    assert len(train) == PROFILES["tiny"].n_train and len(val) == PROFILES["tiny"].n_val
    assert not set(train) & set(val)
    layout = VOCLayout(root, label_space())
    for image_id in train[:8]:
        mask = layout.read_label(image_id)
        present = set(np.unique(mask).tolist()) - {0, 255}
        assert present, "every image has a foreground object"
        assert 255 in mask, "object borders carry the VOC ignore band"
        xml_labels = set((np.flatnonzero(layout.labels_from_xml(image_id)) + 1).tolist())
        assert xml_labels == present
        tree = ElementTree.parse(root / "Annotations" / f"{image_id}.xml")
        for box in tree.iter("bndbox"):
            assert 1 <= int(box.findtext("xmin")) <= int(box.findtext("xmax")) <= PROFILES["tiny"].width
        points = json.loads((root / "Points" / f"{image_id}.json").read_text())
        for p in points:
            assert mask[p["y"], p["x"]] == label_space().index(p["class"])
        scribbles = read_label_png(root / "Scribbles" / f"{image_id}.png", label_space())
        drawn = scribbles != 255
        assert drawn.any()
        assert np.all((scribbles[drawn] == mask[drawn]) | (mask[drawn] == 255))
        parts = read_label_png(root / "SegmentationPart" / f"{image_id}.png", part_label_space())
        assert ((parts > 0) & (parts != 255)).sum() > 0


def test_every_class_has_two_to_four_parts():
    assert all(2 <= len(c.parts) <= 4 for c in CLASSES)
    assert len(CLASSES) == 10


def test_no_class_is_separable_by_colour():
    """Mean object colours of different classes overlap: a nearest-mean colour classifier is poor."""
    prof = PROFILES["tiny"]
    feats, labels = [], []
    for i in range(150):
        s = render_sample(1, "train", i, prof)
        for obj in s.objects:
            feats.append(s.image[obj.mask].mean(0))
            labels.append(obj.cls)
    feats, labels = np.asarray(feats), np.asarray(labels)
    half = len(labels) // 2
    means = np.stack([feats[:half][labels[:half] == c].mean(0) for c in range(len(CLASSES))])
    pred = np.argmin(((feats[half:, None] - means[None]) ** 2).sum(-1), 1)
    accuracy = (pred == labels[half:]).mean()
    assert accuracy < 0.45, f"colour alone classifies objects with accuracy {accuracy:.2f}"


def test_cooccurrence_bias_with_home_scene():
    prof = PROFILES["tiny"]
    at_home = total = 0
    for i in range(200):
        s = render_sample(2, "train", i, prof)
        for obj in s.objects:
            total += 1
            at_home += CLASSES[obj.cls].home == s.scene
    # Uniform scenes would give 1/5; the bias makes home scenes dominant but not exclusive.
    assert 0.5 < at_home / total < 0.95


def test_scale_range_and_object_count():
    prof = PROFILES["demo"]
    areas, counts = [], []
    for i in range(120):
        s = render_sample(0, "train", i, prof)
        counts.append(len(s.objects))
        areas += [o.mask.sum() for o in s.objects]
    assert min(counts) == 1 and max(counts) == 4
    assert np.percentile(areas, 95) / np.percentile(areas, 5) > 8  # 4x linear range -> >8x in area

"""EvalParts's metrics on hand-made confusion matrices and adjacency Grams."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.labelspace import LabelSpace
from data.parts import PartSpace
from stages.parts.evaluate import adjacency_scores, image_adjacency, part_scores, summarise_parts
from stages.parts.graph_matching import graph_matching_maps

# background; object a with parts 1, 2; object b with parts 3, 4
SPACE = PartSpace(LabelSpace(("background", "a.x", "a.y", "b.x", "b.y")), LabelSpace(("background", "a", "b")),
                  (0, 1, 1, 2, 2))


def test_part_miou_counts_background_and_leaves_out_absent_parts():
    conf = np.array([[8, 2, 0, 0, 0],     # rows GT, columns prediction
                     [0, 6, 2, 0, 0],
                     [0, 0, 4, 0, 0],
                     [0, 0, 0, 0, 0],     # part 3: neither in the GT nor predicted
                     [0, 0, 0, 2, 2]])    # part 4 half predicted as part 3 (same object)
    s = part_scores(conf, SPACE, unidentifiable=("a.y", "not.a.part"))
    iou = [8 / 10, 6 / 10, 4 / 6, 0.0, 2 / 4]  # part 3 is predicted (2 px), never in the GT: TP + FP + FN > 0
    assert s["iou"] == pytest.approx(iou)
    assert s["miou"] == pytest.approx(np.mean(iou))
    assert s["miou_no_bg"] == pytest.approx(np.mean(iou[1:]))
    assert s["miou_identifiable"] == pytest.approx(np.mean([iou[0], iou[1], iou[3], iou[4]]))
    assert s["unidentifiable_parts"] == ["a.y"]
    # per object: background alone; a = parts 1, 2; b = parts 3, 4
    per_object = [iou[0], (iou[1] + iou[2]) / 2, (iou[3] + iou[4]) / 2]
    assert s["object_mean_part_iou_zero"] == pytest.approx(np.mean(per_object))
    # collapsed: background 8|2, a: GT 12 (10 a + 0), b: GT 4 all predicted b
    obj = np.array([[8, 2, 0], [0, 12, 0], [0, 0, 4]])
    assert s["object_miou"] == pytest.approx(np.mean([8 / 10, 12 / 14, 4 / 4]))
    assert obj.sum() == conf.sum()
    assert s["pixel_accuracy"] == pytest.approx(20 / 26)
    assert s["mean_accuracy_no_bg"] == pytest.approx(np.mean([6 / 8, 4 / 4, 2 / 4]))


def test_absent_parts_count_zero_in_one_convention_and_are_left_out_in_the_other():
    conf = np.zeros((5, 5), np.int64)
    conf[0, 0], conf[1, 1], conf[3, 3] = 10, 5, 5   # parts 2 and 4 absent everywhere
    s = part_scores(conf, SPACE)
    assert s["iou"] == [1.0, 1.0, None, 1.0, None]
    assert s["miou"] == 1.0
    assert s["object_mean_part_iou_present"] == 1.0
    assert s["object_mean_part_iou_zero"] == pytest.approx(np.mean([1.0, 0.5, 0.5]))  # the reference's quirk


def test_pooled_adjacency_equals_the_released_loss_on_the_set_as_one_batch():
    rng = np.random.default_rng(0)
    images = []
    for _ in range(3):
        gt = np.repeat(np.repeat(rng.integers(0, 5, (3, 4)), 3, 0), 3, 1).astype(np.uint8)
        gt[rng.random(gt.shape) < 0.1] = 255
        pred = np.where(rng.random(gt.shape) < 0.2, rng.integers(0, 5, gt.shape), gt).astype(np.uint8)
        pred[pred == 255] = 0
        images.append((pred, gt))
    shards = []
    for pred, gt in images:
        gp, gg, shown, own = image_adjacency(pred, gt, 5, 2, "same")
        assert own == pytest.approx(graph_matching_maps(torch.from_numpy(pred[None].astype(np.int64)),
                                                        torch.from_numpy(gt[None].astype(np.int64)), 5,
                                                        dtype=torch.float64).item())
        shards.append({"confusion": np.zeros((5, 5), int).tolist(), "gram_pred": gp.tolist(),
                       "gram_label": gg.tolist(), "shown": shown.tolist(), "adjacency_per_image": [own]})
    shards[0]["confusion"] = np.eye(5, dtype=int).tolist()
    s = summarise_parts(shards, SPACE, ())
    batch_pred = torch.from_numpy(np.stack([p for p, _ in images]).astype(np.int64))
    batch_gt = torch.from_numpy(np.stack([g for _, g in images]).astype(np.int64))
    pooled = graph_matching_maps(batch_pred, batch_gt, 5, dtype=torch.float64).item()
    assert s["adjacency_error"] == pytest.approx(pooled, abs=1e-12)
    assert s["adjacency_error_per_image"] == pytest.approx(np.mean([sh["adjacency_per_image"][0] for sh in shards]))


def test_cross_object_adjacency_share():
    gram = np.zeros((5, 5))
    gram[1, 2] = 6  # a.x next to a.y: within object a
    gram[2, 3] = 2  # a.y next to b.x: across objects
    s = adjacency_scores(gram, gram, np.array([True, True, True, True, False]), SPACE)
    assert s["adjacency_error"] == 0.0
    assert s["cross_object_adjacency"] == pytest.approx(2 / 8)

"""Evaluation protocol and the one-pass threshold sweep against a direct computation."""

from __future__ import annotations

import numpy as np
import pytest

from stages.metrics import ThresholdSweep, cam_prediction, confusion, scores


def test_confusion_ignores_gt_255_and_handles_pred_255():
    gt = np.array([[0, 1, 255], [2, 2, 1]])
    pred = np.array([[0, 1, 1], [255, 2, 0]])
    as_bg = confusion(gt, pred, 3, pred_ignore="background")
    assert as_bg.sum() == 5 and as_bg[2, 0] == 1
    excluded = confusion(gt, pred, 3, pred_ignore="exclude")
    assert excluded.sum() == 4 and excluded[2, 0] == 0
    s = scores(as_bg)
    # bg: tp 1, gt 1, pred 3 -> 1/3; class 1: tp 1, gt 2, pred 1 -> 1/2; class 2: likewise 1/2
    assert s["miou"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)


def test_absent_class_is_nan_not_zero():
    conf = confusion(np.array([0, 0, 1]), np.array([0, 0, 1]), 4)
    assert scores(conf)["miou"] == pytest.approx(1.0)


def test_sweep_equals_direct_evaluation():
    rng = np.random.default_rng(0)
    thresholds = np.round(np.arange(0, 0.61, 0.05), 5)
    sweep = ThresholdSweep(thresholds, 6)
    images = []
    for _ in range(5):
        keys = sorted(rng.choice(np.arange(1, 6), size=rng.integers(1, 4), replace=False).tolist())
        cams = rng.random((len(keys), 12, 9)).astype(np.float32)
        cams[0, 0, 0] = 0.25  # exactly on a threshold: background must win the tie
        gt = rng.integers(0, 6, (12, 9))
        gt[rng.random((12, 9)) < 0.1] = 255
        sweep.add(cams, keys, gt)
        images.append((cams, keys, gt))
    for t, conf in zip(thresholds, sweep.confusions()):
        direct = sum(confusion(gt, cam_prediction(c, k, t), 6) for c, k, gt in images)
        np.testing.assert_array_equal(conf, direct)

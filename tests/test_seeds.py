"""Dense CRF helpers, the confident-seed rules (irn / psa / a2gnn) and seed quality metrics."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from stages.config import ExtractSeedsConfig
from stages.refine.crf import dense_crf, label_crf, label_unary
from stages.seeds.rules import SEED_METHODS, SeedQuality, extract_seeds, validate_seed_config

H, W = 40, 50


def ring_scene(core_keys: tuple[int, ...] = (1,)) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A square object (core) inside a ring, on a background; each region has its own colour.

    Returns rgb, core mask, ring mask, and a CAM (1, H, W): 1 in the core, 0.2 in the ring, 0 outside.
    """
    rgb = np.full((H, W, 3), 30, np.uint8)
    ring = np.zeros((H, W), bool)
    ring[8:32, 13:37] = True
    core = np.zeros((H, W), bool)
    core[14:26, 19:31] = True
    ring &= ~core
    rgb[ring] = (120, 90, 60)
    rgb[core] = (220, 200, 40)
    cam = np.zeros((1, H, W), np.float32)
    cam[0, ring] = 0.2
    cam[0, core] = 1.0
    return rgb, core, ring, cam


# ------------------------------------------------------------------------------------------------- CRF

def test_dense_crf_matches_pydensecrf_unary_from_softmax_on_unnormalised_scores():
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    cam = rng.random((2, H, W)).astype(np.float32)
    cam[0, :5] = 0.0  # exercises the 1e-5 clip
    scores = np.concatenate([np.power(1 - cam.max(0, keepdims=True), 4), cam])  # PSA's unnormalised stack
    assert not np.allclose(scores.sum(0), 1)

    ours = dense_crf(rgb, scores, gaussian=(3, 3), bilateral=(80, 13, 10), iterations=5)

    crf = dcrf.DenseCRF2D(W, H, 3)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(scores)))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=80, srgb=13, rgbim=np.ascontiguousarray(rgb), compat=10)
    reference = np.asarray(crf.inference(5), np.float32).reshape(3, H, W)

    assert ours.shape == (3, H, W) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference, atol=1e-6)
    np.testing.assert_allclose(ours.sum(0), 1, atol=1e-4)
    # Renormalising only adds a per-pixel constant to the energy, so it matters only through the clip:
    # with small scores, clipping the raw scores (as the reference does) differs from clipping normalised ones.
    small = scores * 1e-4
    raw = dense_crf(rgb, small, (3, 3), (80, 13, 10), 5)
    normalised = dense_crf(rgb, small / small.sum(0, keepdims=True), (3, 3), (80, 13, 10), 5)
    assert np.abs(normalised - raw).max() > 1e-2


def test_label_unary_matches_pydensecrf_without_zero_unsure():
    from pydensecrf.utils import unary_from_labels

    labels = np.random.default_rng(1).integers(0, 3, (6, 7))
    np.testing.assert_allclose(label_unary(labels, 3, 0.7),
                               unary_from_labels(labels, 3, gt_prob=0.7, zero_unsure=False), rtol=1e-6)


def test_label_crf_cleans_noisy_labels_on_two_region_image():
    rng = np.random.default_rng(0)
    rgb = np.full((H, W, 3), 40, np.uint8)
    rgb[:, W // 2:] = 210
    truth = np.zeros((H, W), np.int64)
    truth[:, W // 2:] = 1
    noisy = np.where(rng.random((H, W)) < 0.2, 1 - truth, truth)

    cleaned = label_crf(rgb, noisy, 2, gt_prob=0.7, gaussian=(3, 3), bilateral=(50, 5, 10), iterations=10)

    assert (noisy == truth).mean() < 0.85
    assert (cleaned == truth).mean() > 0.99


@pytest.mark.parametrize("call, message", [
    (lambda: dense_crf(np.zeros((H, W, 3), np.float32), np.ones((2, H, W))), "uint8"),
    (lambda: dense_crf(np.zeros((H, W, 3), np.uint8), np.ones((2, H, W + 1))), "differs"),
    (lambda: dense_crf(np.zeros((H, W, 3), np.uint8), np.ones((0, H, W))), "at least one label"),
    (lambda: dense_crf(np.zeros((H, W), np.uint8), np.ones((2, H, W))), r"\(H, W, 3\)"),
    (lambda: label_crf(np.zeros((H, W, 3), np.uint8), np.zeros((H, W), np.int64), 0), "at least one label"),
    (lambda: label_crf(np.zeros((H, W, 3), np.uint8), np.full((H, W), 2), 2), r"\[0, 2\)"),
    (lambda: label_crf(np.zeros((H, W, 3), np.uint8), np.zeros((H - 1, W), np.int64), 2), "differs"),
])
def test_crf_rejects_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ----------------------------------------------------------------------------------------------- seeds

def test_irn_seeds_fg_core_bg_far_ignore_ring():
    rgb, core, ring, cam = ring_scene()
    seeds = SEED_METHODS.get("irn")(rgb, cam, [7], ExtractSeedsConfig())
    assert seeds.label.dtype == np.uint8 and seeds.label.shape == (H, W) and seeds.scores == {}
    outside = ~(core | ring)
    # CAM 0.2 in the ring: background in the strict pass (0.30), foreground in the loose one (0.05) -> ignore.
    assert (seeds.label[core] == 7).mean() > 0.95
    assert (seeds.label[ring] == 255).mean() > 0.95
    assert (seeds.label[outside] == 0).mean() > 0.95
    # Lowering the strict threshold below the ring's CAM turns the ring into foreground.
    loose = SEED_METHODS.get("irn")(rgb, cam, [7], ExtractSeedsConfig(fg_threshold=0.1))
    assert (loose.label[ring] == 7).mean() > 0.95


def test_irn_seeds_two_classes_map_to_their_keys():
    rgb, core, _, cam = ring_scene()
    left = np.zeros((H, W), bool)
    left[:, : W // 2] = True
    cams = np.stack([cam[0] * left, cam[0] * ~left])
    rgb[core & ~left] = (40, 60, 230)  # the CRF would merge two classes of one colour
    seeds = extract_seeds(rgb, cams, [4, 9], ExtractSeedsConfig(seed_method="irn"))
    assert set(np.unique(seeds.label[core & left])) <= {4, 255}
    assert set(np.unique(seeds.label[core & ~left])) <= {9, 255}
    assert (seeds.label[core] != 255).mean() > 0.8


def test_psa_seeds_follow_la_ha_rule():
    rgb, core, ring, cam = ring_scene()
    seeds = SEED_METHODS.get("psa")(rgb, cam, [3], ExtractSeedsConfig())
    la, ha = seeds.scores["la"], seeds.scores["ha"]
    assert la.shape == ha.shape == (2, H, W) and la.dtype == np.float32
    # Ring CAM 0.2: (0.8)^4 = 0.41 beats it in la (-> ignore), (0.8)^32 = 0.0008 loses in ha (stays ignore).
    assert (la.argmax(0)[ring] == 0).mean() > 0.95 and (ha.argmax(0)[ring] == 1).mean() > 0.95
    assert (seeds.label[core] == 3).mean() > 0.95
    assert (seeds.label[ring] == 255).mean() > 0.95
    assert (seeds.label[~(core | ring)] == 0).mean() > 0.95
    # The label is exactly the rule applied to the returned marginals.
    expected = np.where(la.argmax(0) == 0, 255, 3)
    expected[ha.argmax(0) == 0] = 0
    np.testing.assert_array_equal(seeds.label, expected)


def test_a2gnn_keeps_top_fraction_of_class_argmax_region():
    rgb = np.full((H, W, 3), 30, np.uint8)
    square = np.zeros((H, W), bool)
    square[10:30, 15:35] = True
    rgb[square] = 220
    cam = np.zeros((1, H, W), np.float32)
    # Distinct values from 0.5 to 1.0 inside the square, in a scrambled order.
    cam[0, square] = np.random.default_rng(0).permutation(np.linspace(0.5, 1.0, square.sum()))
    cfg = ExtractSeedsConfig(seed_method="a2gnn")
    seeds = extract_seeds(rgb, cam, [5], cfg)

    kept = square & (seeds.label == 5)
    assert abs(kept.sum() / square.sum() - 0.4) < 0.01
    assert cam[0][kept].min() > cam[0][square & ~kept].max()  # the kept ones are the highest CAMs
    assert (seeds.label[~square] == 0).mean() > 0.95
    assert set(np.unique(seeds.label)) <= {0, 5, 255}
    smaller = extract_seeds(rgb, cam, [5], dataclasses.replace(cfg, top_fraction=0.2))
    assert abs((smaller.label == 5).sum() / square.sum() - 0.2) < 0.01


def test_a2gnn_drops_background_without_confidence():
    rgb, core, ring, cam = ring_scene()
    cam[0, ~(core | ring)] = 0.005  # background (1 - 0.005)^32 = 0.85 > 0.8: confident
    strict = ExtractSeedsConfig(seed_method="a2gnn", bg_confidence=0.9)
    seeds = extract_seeds(rgb, cam, [2], ExtractSeedsConfig(seed_method="a2gnn"))
    assert (seeds.label[~(core | ring)] == 0).mean() > 0.95
    assert (extract_seeds(rgb, cam, [2], strict).label[~(core | ring)] == 255).all()


@pytest.mark.parametrize("method", ["irn", "psa", "a2gnn"])
def test_image_without_classes_is_all_background(method):
    rgb = np.full((H, W, 3), 100, np.uint8)
    seeds = SEED_METHODS.get(method)(rgb, np.zeros((0, H, W), np.float32), [], ExtractSeedsConfig())
    assert (seeds.label == 0).all()


@pytest.mark.parametrize("cam, keys, message", [
    (np.zeros((2, H, W), np.float32), [1], "2 CAM channels"),
    (np.zeros((1, H, W + 2), np.float32), [1], "differs"),
    (np.full((1, H, W), 1.5, np.float32), [1], r"in \[0, 1\]"),
    (np.zeros((1, H, W), np.float32), [255], "label ids"),
])
def test_seed_rules_reject_bad_input(cam, keys, message):
    with pytest.raises(ValueError, match=message):
        SEED_METHODS.get("psa")(np.zeros((H, W, 3), np.uint8), cam, keys, ExtractSeedsConfig())


# ----------------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("key, value", [
    ("alpha_low", 0.0), ("alpha_high", -1.0), ("fg_threshold", 1.5), ("bg_threshold", -0.1),
    ("bg_confidence", 2.0), ("crf_confidence", -0.5), ("top_fraction", 0.0), ("top_fraction", 1.2),
    ("label_crf_gt_prob", 1.0), ("label_crf_gt_prob", 0.0), ("crf_iterations", 0), ("seed_method", "nope"),
])
def test_validate_seed_config_names_the_key(key, value):
    validate_seed_config(ExtractSeedsConfig())  # defaults are valid
    with pytest.raises(ValueError, match=f"ExtractSeeds.{key}") as err:
        validate_seed_config(dataclasses.replace(ExtractSeedsConfig(), **{key: value}))
    if key == "seed_method":
        assert "a2gnn, irn, psa" in str(err.value)


# ----------------------------------------------------------------------------------------------- quality

def test_seed_quality_arithmetic_on_hand_example():
    gt = np.array([[0, 0, 1, 1],
                   [0, 2, 1, 255]])
    seed = np.array([[0, 255, 1, 2],
                     [1, 255, 255, 1]])
    quality = SeedQuality(3)
    quality.add(seed, gt)
    quality.add(np.full((2, 2), 255), np.array([[0, 1], [2, 2]]))  # an empty seed image
    s = quality.summary(["background", "a", "b"])

    # GT 0: 4 pixels (3 + 1), seeded 0 once (TP), 1 once; seeded-as-0 = 1.
    assert s["classes"]["background"] == pytest.approx(
        {"precision": 1.0, "recall": 1 / 4, "coverage": 2 / 4, "gt_pixels": 4, "seeded_pixels": 1})
    # GT 1: 4 pixels; seeds 1, 2, 255, 255 -> TP 1. Seeded-as-1: GT 1 once, GT 0 once (the 255-GT seed ignored).
    assert s["classes"]["a"] == pytest.approx(
        {"precision": 1 / 2, "recall": 1 / 4, "coverage": 2 / 4, "gt_pixels": 4, "seeded_pixels": 2})
    # GT 2: 3 pixels, none seeded; seeded-as-2 = 1 (a GT-1 pixel).
    b = s["classes"]["b"]
    assert b["precision"] == 0 and b["recall"] == 0 and b["coverage"] == 0 and b["gt_pixels"] == 3
    assert s["labelled_fraction"] == pytest.approx(4 / 11)
    assert s["precision"] == pytest.approx(2 / 4)
    # IoU over labelled pixels, TP / (GT seeded + seeded as - TP): bg 1 / (2 + 1 - 1), a 1 / (2 + 2 - 1), b 0 / 1.
    assert s["iou"] == pytest.approx([1 / 2, 1 / 3, 0.0])
    assert s["miou"] == pytest.approx((1 / 2 + 1 / 3) / 3)
    assert s["images"] == 2 and s["empty_images"] == 1


def test_seed_quality_rejects_bad_values():
    quality = SeedQuality(3)
    with pytest.raises(ValueError, match="seed value"):
        quality.add(np.array([[7]]), np.array([[0]]))
    with pytest.raises(ValueError, match="differs"):
        quality.add(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="class names"):
        quality.summary(["background"])

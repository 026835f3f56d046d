"""DSRG seeded region growing, the CRF refinement and the SEC/DSRG losses (stages/seed_net/growing.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bench.graph_labels import grow_seeds_baseline, make_case
from data.labelspace import IGNORE_INDEX
from stages.seed_net.growing import (
    CRFRefineConfig,
    DSRGConfig,
    balanced_seed_loss,
    constrain_loss,
    crf_refine,
    dsrg_step,
    floored_softmax,
    grow_seeds,
    resize_images,
)

pytestmark = pytest.mark.usefixtures("one_thread")
C = 4


def row_case(best: list[int], conf: list[float], seeds: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 1 x W image: pixel x has probability conf[x] on class best[x], the rest spread evenly."""
    w = len(best)
    refined = np.zeros((1, C, 1, w), np.float32)
    for x, (c, q) in enumerate(zip(best, conf)):
        refined[0, :, 0, x] = (1 - q) / (C - 1)
        refined[0, c, 0, x] = q
    present = np.zeros((1, C), bool)
    present[0, [0, 1, 2]] = True
    return refined, np.array([[seeds]], np.int64), present


def grow(refined, seeds, present, **kw) -> np.ndarray:
    return grow_seeds(refined, seeds, present, DSRGConfig(**kw)).numpy()


_ = IGNORE_INDEX


def test_foreground_threshold_and_connectivity_stop_growth():
    refined, seeds, present = row_case([1, 1, 1, 1, 1], [0.9, 0.9, 0.86, 0.9, 0.9], [1, _, _, _, _])
    assert grow(refined, seeds, present)[0, 0].tolist() == [1, 1, 1, 1, 1]
    refined, seeds, present = row_case([1, 1, 1, 1, 1], [0.9, 0.9, 0.84, 0.9, 0.9], [1, _, _, _, _])
    # 0.84 < 0.85 breaks the chain: the pixels behind it are not connected to the seed
    assert grow(refined, seeds, present)[0, 0].tolist() == [1, 1, _, _, _]


def test_background_needs_its_own_higher_threshold():
    refined, seeds, present = row_case([0, 0, 0], [0.995, 0.95, 0.995], [0, _, _])
    assert grow(refined, seeds, present)[0, 0].tolist() == [0, _, _]
    refined, seeds, present = row_case([0, 0, 0], [0.995, 0.991, 0.995], [0, _, _])
    assert grow(refined, seeds, present)[0, 0].tolist() == [0, 0, 0]
    # the thresholds are knobs: swapping them lets 0.95 background through
    refined, seeds, present = row_case([0, 0, 0], [0.995, 0.95, 0.995], [0, _, _])
    assert grow(refined, seeds, present, bg_threshold=0.9)[0, 0].tolist() == [0, 0, 0]


def test_growth_only_through_pixels_whose_best_class_is_the_seed_class():
    refined, seeds, present = row_case([1, 2, 1], [0.9, 0.9, 0.9], [1, _, _])
    out = grow(refined, seeds, present)[0, 0].tolist()
    assert out == [1, _, _]   # the class-2 pixel has no class-2 seed in its component either


def test_eight_versus_four_connectivity():
    refined = np.full((1, C, 2, 2), 0.01, np.float32)
    refined[0, 0] = 0.97                      # background, below 0.99: never a candidate
    refined[0, 1, 1, 1], refined[0, 0, 1, 1] = 0.97, 0.01
    seeds = np.full((1, 2, 2), _, np.int64)
    seeds[0, 0, 0] = 1
    present = np.zeros((1, C), bool)
    present[0, 1] = True
    assert grow(refined, seeds, present, connectivity=8)[0, 1, 1] == 1
    assert grow(refined, seeds, present, connectivity=4)[0, 1, 1] == _
    with pytest.raises(ValueError, match="connectivity"):
        grow(refined, seeds, present, connectivity=6)


def test_seeds_keep_their_label_and_other_class_components_do_not_overwrite_them():
    # pixel 1 is a class-1 seed where the CRF is sure of class 2, inside a seeded class-2 component
    refined, seeds, present = row_case([2, 2, 2], [0.95, 0.95, 0.95], [2, 1, _])
    out = grow(refined, seeds, present)[0, 0].tolist()
    assert out == [2, 1, 2]


def test_confident_pixel_of_another_class_on_a_seed_blocks_its_growth():
    # reference quirk: the label map is overwritten by candidates, so a seed under a class-2 candidate anchors nothing
    refined, seeds, present = row_case([2, 1, 1], [0.95, 0.9, 0.9], [1, _, _])
    assert grow(refined, seeds, present)[0, 0].tolist() == [1, _, _]


def test_absent_classes_are_never_labelled():
    refined, seeds, present = row_case([3, 3, 1], [0.97, 0.97, 0.9], [1, _, _])
    out = grow(refined, seeds, present)
    assert not (out == 3).any()
    assert out[0, 0].tolist() == [1, _, _]
    seeds[0, 0, 1] = 3
    with pytest.raises(ValueError, match="not marked present"):
        grow(refined, seeds, present)


def test_empty_seeds_give_all_ignore_and_full_seeds_are_unchanged():
    case = make_case(9, 11, 2, 3, seed=1)
    empty = np.full_like(case["seeds"], _)
    assert (grow(case["refined"], empty, case["present"]) == _).all()
    full = case["refined"].argmax(1)
    full = np.where(case["present"][np.arange(2)[:, None, None], full], full, 0)
    assert (grow(case["refined"], full, case["present"]) == full).all()


def test_batch_images_do_not_connect_and_inputs_are_not_modified():
    refined = np.zeros((2, C, 3, 3), np.float32)
    refined[:, 1] = 0.9
    refined[:, 0] = 0.1
    seeds = np.full((2, 3, 3), _, np.int64)
    seeds[0, 2, 2] = 1                       # only image 0 has a seed; image 1 touches it across the batch axis
    present = np.zeros((2, C), bool)
    present[:, 1] = True
    before = refined.copy(), seeds.copy(), present.copy()
    out = grow(refined, seeds, present)
    assert (out[0] == 1).all() and (out[1] == _).all()
    for a, b in zip(before, (refined, seeds, present)):
        assert np.array_equal(a, b)


def test_restart_from_original_seeds():
    """The update depends only on (probabilities, original seeds): a pixel grown in one iteration is not kept when
    the next iteration's probabilities no longer support it."""
    refined1, seeds, present = row_case([1, 1, 1], [0.9, 0.9, 0.9], [1, _, _])
    refined2, _s, _p = row_case([1, 1, 1], [0.9, 0.5, 0.9], [1, _, _])
    first = grow(refined1, seeds, present)
    assert first[0, 0].tolist() == [1, 1, 1]
    assert grow(refined2, seeds, present)[0, 0].tolist() == [1, _, _]
    assert grow(refined2, first, present)[0, 0].tolist() == [1, 1, 1]   # what accumulating would have given


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("connectivity", [4, 8])
def test_vectorised_growing_equals_python_bfs(seed, connectivity):
    case = make_case(17, 23, 3, 3, seed=seed)
    cfg = DSRGConfig(connectivity=connectivity, fg_threshold=0.6, bg_threshold=0.8)
    ours = grow_seeds(case["refined"], case["seeds"], case["present"], cfg).numpy()
    base = grow_seeds_baseline(case["refined"], case["seeds"], case["present"], cfg)
    assert np.array_equal(ours, base)
    assert (ours != _).sum() > (case["seeds"] != _).sum()     # it grew


def test_bad_inputs_are_rejected():
    refined, seeds, present = row_case([1, 1], [0.9, 0.9], [1, _])
    with pytest.raises(ValueError, match="shape"):
        grow(refined, seeds[:, :, :1], present)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        grow(refined, np.array([[[7, _]]]), present)
    with pytest.raises(ValueError, match="bool"):
        grow(refined, seeds, present.astype(np.int64))


# ---------------------------------------------------------------------------------------------------------------
# CRF


def test_crf_refine_linear_unary_matches_minus_p_energy():
    import pydensecrf.densecrf as dcrf

    rng = np.random.default_rng(0)
    probs = torch.softmax(torch.from_numpy(rng.normal(size=(1, 3, 8, 9)).astype(np.float32)) * 2, dim=1)
    images = rng.integers(0, 256, (1, 8, 9, 3), dtype=np.uint8)
    cfg = CRFRefineConfig(prob_floor=1e-8)
    ours = crf_refine(probs, images, cfg).numpy()[0]
    crf = dcrf.DenseCRF2D(9, 8, 3)
    crf.setUnaryEnergy(np.ascontiguousarray(-probs.numpy()[0].reshape(3, -1)))
    crf.addPairwiseGaussian(sxy=cfg.gaussian[0], compat=cfg.gaussian[1])
    crf.addPairwiseBilateral(sxy=cfg.bilateral[0], srgb=cfg.bilateral[1], rgbim=images[0].copy(),
                             compat=cfg.bilateral[2])
    direct = np.asarray(crf.inference(cfg.iterations)).reshape(3, 8, 9)
    np.testing.assert_allclose(ours, direct, atol=1e-5)
    log = crf_refine(probs, images, CRFRefineConfig(unary="log")).numpy()[0]
    assert np.abs(log - ours).max() > 1e-3
    np.testing.assert_allclose(log.sum(0), 1, atol=1e-5)
    assert log.min() >= 1e-4 * 0.999


def test_resize_images_keeps_corners_and_constant_images():
    img = np.full((2, 40, 30, 3), 77, np.uint8)
    assert (resize_images(img, (5, 4)) == 77).all()
    ramp = np.repeat(np.linspace(0, 250, 30).astype(np.uint8)[None, None, :, None], 3, axis=3)
    small = resize_images(ramp, (1, 4))
    assert small[0, 0, 0, 0] == ramp[0, 0, 0, 0] and small[0, 0, -1, 0] == ramp[0, 0, -1, 0]
    with pytest.raises(ValueError, match="uint8"):
        resize_images(img.astype(np.float32), (5, 4))


# ---------------------------------------------------------------------------------------------------------------
# Losses


def test_balanced_seed_loss_hand_computed():
    p = torch.tensor([[[[0.8, 0.3, 0.5, 0.9]], [[0.2, 0.7, 0.5, 0.1]]],
                      [[[0.6, 0.4, 0.5, 0.5]], [[0.4, 0.6, 0.5, 0.5]]]])        # (2, 2, 1, 4)
    labels = torch.tensor([[[0, 1, 1, _]], [[0, 0, _, _]]])
    bg = (math.log(0.8) + (math.log(0.6) + math.log(0.4)) / 2) / 2
    fg = ((math.log(0.7) + math.log(0.5)) / 2 + 0.0) / 2                      # image 2 has no fg: count floored
    assert balanced_seed_loss(p, labels).item() == pytest.approx(-bg - fg, rel=1e-6)
    # background and foreground are averaged separately: more fg pixels do not outweigh one bg pixel
    labels2 = torch.tensor([[[0, 1, 1, 1]], [[0, 0, _, _]]])
    fg2 = ((math.log(0.7) + math.log(0.5) + math.log(0.1)) / 3) / 2
    assert balanced_seed_loss(p, labels2).item() == pytest.approx(-bg - fg2, rel=1e-6)
    assert balanced_seed_loss(p, torch.full_like(labels, _)).item() == 0.0


def test_constrain_loss_hand_computed_with_clipping_and_gradient():
    p = torch.tensor([[[[0.5, 0.99]], [[0.5, 0.01]]]], requires_grad=True)     # (1, 2, 1, 2)
    q = torch.tensor([[[[0.9, 0.1]], [[0.1, 0.9]]]])
    pixel0 = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    pixel1 = 0.1 * math.log(0.1 / 0.99) + 0.9 * math.log(20.0)               # 0.9 / 0.01 = 90 clipped to 20
    loss = constrain_loss(p, q)
    assert loss.item() == pytest.approx((pixel0 + pixel1) / 2, rel=1e-6)
    loss.backward()
    assert p.grad[0, 1, 0, 1] == 0                                            # clipped ratio: no gradient
    assert p.grad[0, 0, 0, 0].item() == pytest.approx(-0.9 / 0.5 / 2, rel=1e-5)


def test_dsrg_step_gradients_reach_the_logits():
    case = make_case(8, 8, 2, 3, seed=2)
    logits = torch.log(torch.from_numpy(case["probs"])).requires_grad_()
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    step = dsrg_step(logits, images, torch.from_numpy(case["seeds"]), torch.from_numpy(case["present"]))
    assert torch.isfinite(step.loss) and step.loss.item() > 0
    step.loss.backward()
    assert logits.grad.abs().sum() > 0 and torch.isfinite(logits.grad).all()
    assert step.labels.shape == (2, 8, 8) and step.labels.dtype == torch.int64
    np.testing.assert_allclose(floored_softmax(logits, 1e-4).detach(), step.probs.detach())
    assert (step.labels[torch.from_numpy(case["seeds"]) != _] ==
            torch.from_numpy(case["seeds"])[torch.from_numpy(case["seeds"]) != _]).all()

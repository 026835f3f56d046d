"""Images too large to handle, decompression bombs and bad training masks stop PrepareDataset naming the file, or
are quarantined like any bad image (issue 15)."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
from conftest import cfg_for
from PIL import Image

from data.io import BadInputError
from data.voc import read_id_list
from stages.dataset.prepare import prepare_dataset

TRAIN = "ImageSets/Segmentation/train.txt"


def enlarge(root, image_id: str, size: int = 200) -> str:
    """Replace one image (and its mask) by a ``size`` x ``size`` one; returns its image path."""
    path = root / "JPEGImages" / f"{image_id}.jpg"
    Image.fromarray(np.full((size, size, 3), 90, np.uint8)).save(path)
    mask = root / "SegmentationClass" / f"{image_id}.png"
    old = Image.open(mask)
    big = Image.fromarray(np.ones((size, size), np.uint8), mode="P")
    big.putpalette(old.getpalette())
    big.save(mask)
    return str(path)


@pytest.mark.parametrize("on_bad_input", ["error", "quarantine"])
def test_an_image_above_max_pixels_is_refused_naming_it(voc_copy, tmp_path, on_bad_input):
    victim = read_id_list(voc_copy / TRAIN)[1]
    path = enlarge(voc_copy, victim)
    cfg = cfg_for(voc_copy, max_pixels=64 * 80, on_bad_input=on_bad_input)
    if on_bad_input == "error":
        with pytest.raises(BadInputError, match=rf"{victim}\.jpg: image is 200x200 = 40,000 pixels, above "
                                                r"\[PrepareDataset\] max_pixels = 5,120"):
            prepare_dataset(cfg, tmp_path / "out")
    else:
        manifest = prepare_dataset(cfg, tmp_path / "out", log=lambda m: None)
        assert [(q["id"], q["file"]) for q in manifest.quarantine] == [(victim, path)]


@pytest.mark.parametrize("on_bad_input", ["error", "quarantine"])
def test_a_decompression_bomb_is_named_and_quarantined(voc_copy, tmp_path, monkeypatch, on_bad_input):
    victim = read_id_list(voc_copy / TRAIN)[2]
    path = enlarge(voc_copy, victim)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 15_000)   # 200x200 is then over twice PIL's limit: a "bomb"
    cfg = cfg_for(voc_copy, max_pixels=0, on_bad_input=on_bad_input)
    if on_bad_input == "error":
        with pytest.raises(BadInputError, match=rf"{victim}\.jpg: .*decompression bomb"):
            prepare_dataset(cfg, tmp_path / "out")
    else:
        manifest = prepare_dataset(cfg, tmp_path / "out", log=lambda m: None)
        assert [(q["id"], q["file"]) for q in manifest.quarantine] == [(victim, path)]
        assert "decompression bomb" in manifest.quarantine[0]["problem"]


def test_a_bad_training_mask_is_found_when_only_val_is_evaluated(voc_copy, tmp_path):
    """The VOC preset's case: training masks in their own folder (SegmentationClassAug) for ids outside the
    evaluation list; a bad one used to pass and fail hours later in the fully supervised ceiling's training."""
    victim = read_id_list(voc_copy / TRAIN)[4]
    shutil.copytree(voc_copy / "SegmentationClass", voc_copy / "SegmentationClassAug")
    mask = voc_copy / "SegmentationClassAug" / f"{victim}.png"
    img = Image.open(mask)
    img.putpixel((0, 0), 77)
    img.save(mask)
    cfg = cfg_for(voc_copy, eval_list="ImageSets/Segmentation/val.txt", seg_dir="SegmentationClassAug")
    with pytest.raises(BadInputError, match=rf"SegmentationClassAug/{victim}\.png: label values \[77\]"):
        prepare_dataset(cfg, tmp_path / "out")


@pytest.mark.parametrize("crf", [False, True])
def test_a_large_val_image_is_predicted_at_a_bounded_size(monkeypatch, crf):
    """EvalSegmentation's scores, activations and CRF never see more than ``max_pixels`` pixels; the labels come
    back at the image's size. An image within the limit is predicted exactly as without one."""
    import torch

    from models.segmenters import create_segmenter
    from stages.config import EvalSegmentationConfig
    from stages.refine import crf as crf_module
    from stages.segmentation import predict

    torch.manual_seed(0)
    model = create_segmenter("deeplabv2", "resnet_mini", 4, freeze_bn=True).eval()
    rgb = np.random.default_rng(0).integers(0, 255, (150, 200, 3), dtype=np.uint8)
    seen = []
    real_probs, real_refine = predict.predict_probs, crf_module.refine
    monkeypatch.setattr(predict, "predict_probs", lambda m, image, *a: seen.append(image.shape[:2])
                        or real_probs(m, image, *a))
    monkeypatch.setattr(crf_module, "refine", lambda image, *a, **k: seen.append(image.shape[:2])
                        or real_refine(image, *a, **k))
    cfg = EvalSegmentationConfig(scales=(1.0,), flip=False, crf=crf, max_pixels=5_000)
    raw, final = predict.predict_labels(model, rgb, cfg, torch.device("cpu"), "torch")
    assert raw.shape == final.shape == (150, 200) and raw.dtype == final.dtype == np.uint8
    assert seen and all(h * w <= 5_000 for h, w in seen), seen
    assert seen[0] == (61, 81), "aspect kept"
    seen.clear()
    within = dataclasses.replace(cfg, max_pixels=150 * 200)
    unbounded = dataclasses.replace(cfg, max_pixels=0)
    for a, b in zip(predict.predict_labels(model, rgb, within, torch.device("cpu"), "torch"),
                    predict.predict_labels(model, rgb, unbounded, torch.device("cpu"), "torch")):
        assert np.array_equal(a, b)
    assert seen[0] == (150, 200)


def test_the_eval_pixel_limit_leaves_voc_sized_images_alone():
    from stages.config import EvalSegmentationConfig
    from stages.segmentation.predict import bounded_size
    assert bounded_size(500, 500, EvalSegmentationConfig().max_pixels) == (500, 500)
    assert bounded_size(3000, 4000, 1_000_000) == (866, 1154)

"""Images too large to handle, decompression bombs and bad training masks stop PrepareDataset naming the file, or
are quarantined like any bad image (issue 15)."""

from __future__ import annotations

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

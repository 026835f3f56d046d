"""Dataset preparation on VOC-layout data: string ids, label sources, bad input, quarantine."""

from __future__ import annotations

import pytest
from conftest import cfg_for

from data.io import BadInputError
from data.voc import VOCLayout, read_id_list
from stages.dataset.prepare import prepare_dataset


def test_ids_are_strings(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("2007_000032\n2008_000001 1\n# comment\n\n")
    assert read_id_list(path) == ["2007_000032", "2008_000001"]


def test_voc_prepare_labels_from_xml_and_mask_agree(voc_copy, tmp_path):
    a = prepare_dataset(cfg_for(voc_copy), tmp_path / "a")
    b = prepare_dataset(cfg_for(voc_copy, image_labels_from="mask"), tmp_path / "b")
    assert a.image_labels == b.image_labels
    assert a.root == voc_copy.resolve()


def test_id_escaping_root_is_refused(voc_copy):
    from data.synthetic import label_space
    layout = VOCLayout(voc_copy, label_space())
    with pytest.raises(BadInputError, match="invalid image id.*'..' part"):
        layout.image_path("../../etc/passwd")
    with pytest.raises(BadInputError, match="invalid image id"):
        layout.image_path("/etc/passwd")


@pytest.mark.parametrize("damage, problem", [
    ("missing_image", "image file is missing"),
    ("corrupt_image", "cannot decode image"),
    ("bad_label", "outside the label space"),
    ("no_foreground", "no foreground class"),
])
def test_bad_input_errors_and_quarantine(voc_copy, tmp_path, damage, problem):
    ids = read_id_list(voc_copy / "ImageSets/Segmentation/train.txt")
    victim = ids[3]
    if damage == "missing_image":
        (voc_copy / "JPEGImages" / f"{victim}.jpg").unlink()
    elif damage == "corrupt_image":
        (voc_copy / "JPEGImages" / f"{victim}.jpg").write_bytes(b"\xff\xd8garbage")
    elif damage == "bad_label":
        from PIL import Image
        img = Image.open(voc_copy / "SegmentationClass" / f"{victim}.png")
        img.putpixel((0, 0), 77)
        img.save(voc_copy / "SegmentationClass" / f"{victim}.png")
    else:
        xml = voc_copy / "Annotations" / f"{victim}.xml"
        text = xml.read_text()
        xml.write_text(text[: text.index("<object>")] + "</annotation>")
    with pytest.raises(BadInputError, match=f"{victim}.*{problem}"):
        prepare_dataset(cfg_for(voc_copy), tmp_path / "strict")
    manifest = prepare_dataset(cfg_for(voc_copy, on_bad_input="quarantine"), tmp_path / "lenient",
                               log=lambda m: None)
    assert [q["id"] for q in manifest.quarantine] == [victim]
    assert problem in manifest.quarantine[0]["problem"]
    assert victim not in manifest.splits["train"] and victim not in manifest.splits["eval"]
    assert len(manifest.splits["train"]) == len(ids) - 1

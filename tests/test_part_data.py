"""Part label spaces: the embedded set's parts.json, the Pascal-Part tables, and part maps' bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from data.io import BadInputError, write_label_png
from data.labelspace import VOC_LABEL_SPACE, voc_palette
from data.parts import PartLayout, PartSpace, load_part_space
from data.synthetic import CLASSES, label_space, part_space


def test_the_embedded_parts_json_carries_each_parts_object(tiny_dataset):
    space = PartSpace.load(tiny_dataset / "parts.json", label_space())
    assert space == part_space()
    assert space.num_parts == 28 and space.num_objects == 11
    for p, name in enumerate(space.parts.names[1:], start=1):  # the name prefix is the object
        assert space.objects.names[space.object_of_part[p]] == name.split(".")[0]
    assert [len(space.parts_of(o)) for o in range(1, 11)] == [len(c.parts) for c in CLASSES]


def test_embedded_part_maps_agree_with_the_object_maps(tiny_dataset):
    layout = PartLayout(tiny_dataset, part_space(), band=0)
    ids = (tiny_dataset / "ImageSets/Segmentation/train.txt").read_text().split()[:6]
    for image_id in ids:
        parts, objects = layout.read(image_id)
        valid = parts != 255
        assert np.array_equal(part_space().lookup()[parts][valid], objects[valid])


def test_pascal_part_tables():
    pp58 = load_part_space("pascal_part_58", "/nonexistent", VOC_LABEL_SPACE)
    pp108 = load_part_space("pascal_part_108", "/nonexistent", VOC_LABEL_SPACE)
    assert pp58.num_parts == 58 and pp108.num_parts == 108
    sizes = [len(pp58.parts_of(o)) for o in range(21)]
    assert sizes == [1, 5, 2, 4, 1, 2, 3, 5, 4, 1, 4, 1, 4, 4, 2, 6, 2, 3, 1, 1, 2]
    starts = [pp108.parts_of(o)[0] for o in range(21)]
    assert starts == [0, 1, 6, 10, 18, 19, 21, 29, 36, 45, 46, 54, 55, 65, 73, 77, 89, 91, 99, 100, 107]
    assert pp58.parts.names[43] == "person.head" and pp108.parts.names[107] == "tvmonitor.screen"
    with pytest.raises(ValueError, match="21 VOC objects"):
        load_part_space("pascal_part_58", "/nonexistent", label_space())


def voc_part_root(tmp_path, parts: np.ndarray, objects: np.ndarray):
    """A one-image VOC-layout root with a Pascal-Part-58 part map, its object map and a parts.json."""
    root = tmp_path / "pp"
    write_label_png(root / "SegmentationPart" / "2008_000001.png", parts, voc_palette())
    write_label_png(root / "SegmentationClass" / "2008_000001.png", objects, voc_palette())
    load_part_space("pascal_part_58", root, VOC_LABEL_SPACE).save(root / "parts.json")
    return root


def person_and_cat(h: int = 20, w: int = 20) -> tuple[np.ndarray, np.ndarray]:
    parts = np.zeros((h, w), np.uint8)
    parts[2:10, 2:10], parts[10:18, 2:10] = 43, 44           # person head, torso
    parts[2:18, 12:18] = 26                                  # cat torso
    objects = PartSpaceCache.pp58.lookup()[parts]
    return parts, objects


class PartSpaceCache:
    pp58 = load_part_space("pascal_part_58", "/nonexistent", VOC_LABEL_SPACE)


def test_a_voc_layout_part_dataset_reads_from_a_user_path(tmp_path):
    parts, objects = person_and_cat()
    root = voc_part_root(tmp_path, parts, objects)
    space = load_part_space("parts.json", root, VOC_LABEL_SPACE)
    got_parts, got_objects = PartLayout(root, space).read("2008_000001")
    assert np.array_equal(got_parts, parts) and np.array_equal(got_objects, objects)


def test_bad_part_input_names_the_file(tmp_path):
    parts, objects = person_and_cat()
    root = voc_part_root(tmp_path, parts, objects)
    space = load_part_space("parts.json", root, VOC_LABEL_SPACE)
    # a part label outside the part space
    bad = parts.copy()
    bad[0, 0] = 58
    write_label_png(root / "SegmentationPart" / "2008_000001.png", bad, voc_palette())
    with pytest.raises(BadInputError, match=r"SegmentationPart/2008_000001.png.*outside the label space"):
        PartLayout(root, space).read("2008_000001")
    # an object disagreeing inside a region, beyond the band: refused; on the border, within the band: kept
    write_label_png(root / "SegmentationPart" / "2008_000001.png", parts, voc_palette())
    wrong = objects.copy()
    wrong[4:8, 4:8] = 8  # cat where the person's head is: its 2x2 interior lies beyond a 1 px band
    write_label_png(root / "SegmentationClass" / "2008_000001.png", wrong, voc_palette())
    with pytest.raises(BadInputError, match=r"SegmentationPart/2008_000001.png: 4 part pixels .*"
                                            r"SegmentationClass/2008_000001.png"):
        PartLayout(root, space, band=1).read("2008_000001")
    shifted = objects.copy()
    shifted[:, 10] = shifted[:, 9]  # the object border one pixel off the part border
    write_label_png(root / "SegmentationClass" / "2008_000001.png", shifted, voc_palette())
    PartLayout(root, space, band=1).read("2008_000001")
    with pytest.raises(BadInputError, match="belong to another object"):
        PartLayout(root, space, band=0).read("2008_000001")
    # a missing or incomplete parts.json
    (root / "parts.json").unlink()
    with pytest.raises(BadInputError, match=r"pp/parts.json: part label space \(parts.json\) is missing"):
        load_part_space("parts.json", root, VOC_LABEL_SPACE)
    (root / "parts.json").write_text(json.dumps(VOC_LABEL_SPACE.to_dict()))
    with pytest.raises(BadInputError, match=r"parts.json: needs an 'object_of_part'"):
        load_part_space("parts.json", root, VOC_LABEL_SPACE)
    spec = PartSpaceCache.pp58.to_dict()
    spec["object_of_part"][5] = 21
    (root / "parts.json").write_text(json.dumps(spec))
    with pytest.raises(BadInputError, match=r"parts.json: object_of_part values \[21\] are outside"):
        load_part_space("parts.json", root, VOC_LABEL_SPACE)
    shutil.rmtree(root)

"""Label spaces, label PNG reading/writing, atomic writes, HDF5 dense maps."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from data.dense import DenseMapReader, DenseMapWriter
from data.io import BadInputError, atomic_path, read_image, read_label_png, write_label_png
from data.labelspace import VOC_LABEL_SPACE, LabelSpace, voc_palette


def test_voc_palette_matches_devkit():
    pal = voc_palette()
    assert tuple(pal[1]) == (128, 0, 0)
    assert tuple(pal[15]) == (192, 128, 128)
    assert tuple(pal[255]) == (224, 224, 192)


def test_label_space_roundtrip_and_errors(tmp_path):
    path = tmp_path / "ls.json"
    VOC_LABEL_SPACE.save(path)
    assert LabelSpace.load(path).names == VOC_LABEL_SPACE.names
    path.write_text('{"names": ["background", "a", "a"]}')
    with pytest.raises(ValueError, match="ls.json.*duplicate"):
        LabelSpace.load(path)


def test_one_ignore_value_and_a_label_space_asking_for_another_names_its_file(tmp_path):
    path = tmp_path / "ls.json"
    path.write_text('{"names": ["background", "a"], "ignore_index": 255}')
    assert LabelSpace.load(path).ignore_index == 255
    path.write_text('{"names": ["background", "a"], "ignore_index": 254}')
    with pytest.raises(ValueError, match=r"ls\.json: ignore_index = 254; only 255 is supported"):
        LabelSpace.load(path)
    with pytest.raises(ValueError, match="only 255"):
        LabelSpace(names=("background", "a"), ignore_index=0)


def test_label_png_roundtrip_and_checks(tmp_path):
    labels = np.array([[0, 1, 2], [255, 20, 0]], np.uint8)
    path = tmp_path / "a.png"
    write_label_png(path, labels, voc_palette())
    assert Image.open(path).mode == "P"
    np.testing.assert_array_equal(read_label_png(path, VOC_LABEL_SPACE), labels)
    write_label_png(path, np.array([[0, 21]], np.uint8), voc_palette())
    with pytest.raises(BadInputError, match=r"a\.png.*\[21\].*outside the label space"):
        read_label_png(path, VOC_LABEL_SPACE)
    with pytest.raises(BadInputError, match=r"a\.png: label map is 1x2 \(HxW\) but its image is 2x1"):
        read_label_png(path, VOC_LABEL_SPACE, shape=(2, 1))
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(BadInputError, match="rgb.png.*mode"):
        read_label_png(tmp_path / "rgb.png", VOC_LABEL_SPACE)


def test_unreadable_image_names_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(BadInputError, match="broken.jpg.*cannot decode"):
        read_image(bad)
    with pytest.raises(BadInputError, match="missing.jpg.*missing"):
        read_image(tmp_path / "missing.jpg")


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole"


def test_dense_maps_roundtrip_across_shards(tmp_path):
    rng = np.random.default_rng(0)
    maps = {f"img_{i}": rng.random((2, 9, 13), dtype=np.float32) for i in range(5)}
    for shard, ids in enumerate((["img_0", "img_1"], ["img_2", "img_3", "img_4"])):
        with DenseMapWriter(tmp_path / f"s{shard}.h5") as writer:
            for i in ids:
                writer.write(i, {"cam": maps[i]}, {"keys": np.array([3, 7])})
    reader = DenseMapReader(sorted(tmp_path.glob("*.h5")))
    assert sorted(reader.ids()) == sorted(maps)
    arrays, attrs = reader.read("img_3")
    np.testing.assert_allclose(arrays["cam"], maps["img_3"], atol=1e-3)  # float16 storage
    assert attrs["keys"].tolist() == [3, 7]
    with pytest.raises(BadInputError, match="no dense map stored for image 'nope'"):
        reader.read("nope")


def test_dense_writer_killed_leaves_no_file(tmp_path):
    with pytest.raises(KeyError):
        with DenseMapWriter(tmp_path / "s.h5") as writer:
            writer.write("a", {"cam": np.zeros((1, 2, 2))})
            raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []

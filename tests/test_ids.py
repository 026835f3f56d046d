"""Image ids: one canonical spelling, refused at PrepareDataset naming the list and line, and never a path
outside the folder a per-image file is written to (issue 15)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import cfg_for

from data.artifacts import RAW_PREDICTIONS, UnsafeImageIdError, label_file
from data.io import BadInputError
from data.voc import read_id_list
from stages.dataset.prepare import prepare_dataset

REPO = Path(__file__).resolve().parent.parent
TRAIN = "ImageSets/Segmentation/train.txt"


@pytest.mark.parametrize("line, problem", [
    ("../syn_000001", r"'\.\.' part"),
    ("./syn_000001", r"'\.' part"),
    ("a//syn_000001", "empty"),
    ("syn_000001/", "empty"),
    ("/etc/passwd", "absolute path"),
    ("a\\syn_000001", "backslash"),
    ("syn\x07000001", "control or format character U\\+0007"),
    ("syn_000001#2", "'#' after the id"),
    ("my image", "not one id"),
])
def test_a_bad_id_is_refused_naming_the_list_and_line(tmp_path, line, problem):
    path = tmp_path / "ids.txt"
    path.write_text(f"syn_000000\n# a comment\n{line}\n")
    with pytest.raises(BadInputError, match=rf"ids\.txt: line 3: .*{problem}"):
        read_id_list(path)


def test_a_byte_order_mark_and_non_utf8_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_bytes("\ufeffsyn_000000\nsyn_000001\n".encode())
    with pytest.raises(BadInputError, match=r"ids\.txt: line 1: .*byte-order mark"):
        read_id_list(path)
    path.write_bytes(b"syn_\xff000\n")
    with pytest.raises(BadInputError, match=r"ids\.txt: image list is not UTF-8"):
        read_id_list(path)


def test_voc_second_column_and_comments_still_read(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("2007_000032 -1\n  # indented comment\n2008_000001 1\nsub/dir_id\n")
    assert read_id_list(path) == ["2007_000032", "2008_000001", "sub/dir_id"]


def test_symlinked_folder_id_is_refused_at_prepare_dataset(voc_copy, tmp_path):
    """The issue's reproduction: a symlinked folder inside the dataset makes ``lnk/../../../../syn_000001`` read a
    real image, and the seed stage then wrote ``labels/lnk/../../../../syn_000001.png`` above its directory."""
    victim = read_id_list(voc_copy / TRAIN)[0]
    for folder in ("JPEGImages", "Annotations", "SegmentationClass"):
        deep = voc_copy / folder / "a" / "b" / "c" / "d"
        deep.mkdir(parents=True)
        (voc_copy / folder / "lnk").symlink_to(deep, target_is_directory=True)
    hostile = f"lnk/../../../../{victim}"
    assert (voc_copy / "JPEGImages" / f"{hostile}.jpg").resolve() == (voc_copy / "JPEGImages" / f"{victim}.jpg")
    lines = (voc_copy / TRAIN).read_text().splitlines()
    (voc_copy / TRAIN).write_text("\n".join([*lines, hostile]) + "\n")
    with pytest.raises(BadInputError, match=rf"train\.txt: line {len(lines) + 1}: invalid image id .*'\.\.' part"):
        prepare_dataset(cfg_for(voc_copy), tmp_path / "out")


def test_every_per_image_path_stays_in_its_folder(tmp_path):
    out = tmp_path / "stage"
    assert label_file(out, "sub/syn_000001") == out / "labels" / "sub" / "syn_000001.png"
    assert label_file(out, "x", folder=RAW_PREDICTIONS) == out / "raw" / "x.png"
    for hostile in ("lnk/../../../../syn_000001", "/tmp/x", "..", "a\\..\\b", ""):
        with pytest.raises(UnsafeImageIdError, match="image id"):
            label_file(out, hostile)
    # A well-spelt id through a symlinked folder planted in the output: still refused.
    (out / "labels").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (out / "labels" / "lnk").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(UnsafeImageIdError, match="resolves outside"):
        label_file(out, "lnk/syn_000001")


def test_no_stage_builds_a_per_image_path_by_hand():
    """Per-image files are named only through data.artifacts.label_file, so a new stage cannot skip the check."""
    by_hand = re.compile(r"""f["'][^"']*\{image_id\}\.(png|jpg|h5|json|npy)""")
    offenders = [f"{path.relative_to(REPO)}:{n}" for folder in ("stages", "pipeline")
                 for path in (REPO / folder).rglob("*.py")
                 for n, line in enumerate(path.read_text().splitlines(), start=1) if by_hand.search(line)]
    assert offenders == []


def test_an_id_in_both_train_and_val_is_warned_about(voc_copy, tmp_path):
    train = read_id_list(voc_copy / TRAIN)
    val_path = voc_copy / "ImageSets/Segmentation/val.txt"
    val_path.write_text(val_path.read_text() + train[0] + "\n")
    messages = []
    prepare_dataset(cfg_for(voc_copy, val_list="ImageSets/Segmentation/val.txt"), tmp_path / "out",
                    log=messages.append)
    assert any("1 image id(s) are in both" in m and train[0] in m and "val.txt" in m for m in messages)

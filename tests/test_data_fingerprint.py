"""Edits to an external dataset's files reach the cache: PrepareDataset's key holds a fingerprint of every file
the manifest reads, and what follows reruns only where the manifest changes (issue 15)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import luigi
import numpy as np
import pytest
from conftest import run_luigi
from PIL import Image

from data.voc import read_id_list
from pipeline.framework import PENDING, StageTask
from pipeline.tasks import PrepareDataset
from stages.config import DatasetConfig
from stages.dataset.prepare import input_fingerprint

RUNS: list[str] = []   # keys CountsManifestReads computed, in order


class CountsManifestReads(StageTask):
    """The smallest stage that reads the dataset: records each computation."""

    def upstream(self):
        return {"dataset": self.stage(PrepareDataset)}

    def compute(self, out_dir: Path) -> dict:
        RUNS.append(self.key)
        (out_dir / "seen").write_bytes((self.input_dir("dataset") / "manifest.json").read_bytes())
        return {}


@pytest.fixture
def voc_copy(tiny_dataset, tmp_path):
    root = tmp_path / "voc"
    shutil.copytree(tiny_dataset, root)
    return root


@pytest.fixture
def voc_config(luigi_config, voc_copy):
    for option, value in (("kind", "voc"), ("root", voc_copy), ("label_space", voc_copy / "labelspace.json"),
                          ("on_bad_input", "quarantine")):
        luigi_config("PrepareDataset", option, value)
    RUNS.clear()
    return luigi_config


def build() -> CountsManifestReads:
    luigi.task_register.Register.clear_instance_cache()
    task = CountsManifestReads()
    assert run_luigi(task).status.name == "SUCCESS"
    return task


def touch_later(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_fingerprint_sees_edits_and_ignores_nothing(voc_copy):
    cfg = DatasetConfig(kind="voc", root=str(voc_copy), label_space=str(voc_copy / "labelspace.json"))
    content = DatasetConfig(**{**cfg.__dict__, "fingerprint_mode": "content"})
    victim = read_id_list(voc_copy / "ImageSets/Segmentation/train.txt")[0]
    before, before_content = input_fingerprint(cfg), input_fingerprint(content)
    assert input_fingerprint(cfg) == before
    touch_later(voc_copy / "Annotations" / f"{victim}.xml")
    assert input_fingerprint(cfg)["files"] != before["files"]
    assert input_fingerprint(content) == before_content  # a touch is no edit to the bytes
    (voc_copy / "Points" / f"{victim}.json").unlink()
    assert input_fingerprint(content)["files"] != before_content["files"]


def test_data_edits_rerun_prepare_dataset_and_only_manifest_changes_go_further(voc_config, voc_copy):
    first = build()
    key = first.key
    assert RUNS == [key] and not key.startswith(PENDING)
    build()
    assert RUNS == [key]                                     # an unchanged tree: a no-op

    victim = read_id_list(voc_copy / "ImageSets/Segmentation/train.txt")[0]
    image = voc_copy / "JPEGImages" / f"{victim}.jpg"
    prepared = PrepareDataset().key
    touch_later(image)                                       # new mtime, same bytes
    again = build()
    assert PrepareDataset().key != prepared                  # PrepareDataset reran...
    assert again.key == key and RUNS == [key]                # ...and its manifest did not change: nothing else

    mask = voc_copy / "SegmentationClass" / f"{victim}.png"  # a corrected mask: same labels, other pixels
    labels = Image.open(mask)
    values = np.array(labels)
    values[0, 0] = 0 if values[0, 0] else 1
    fixed = Image.fromarray(values, mode="P")
    fixed.putpalette(labels.getpalette())
    fixed.save(mask)
    edited = build()
    assert edited.key != key and RUNS == [key, edited.key]


def test_a_restored_image_leaves_quarantine(voc_config, voc_copy):
    victim = read_id_list(voc_copy / "ImageSets/Segmentation/train.txt")[2]
    image = voc_copy / "JPEGImages" / f"{victim}.jpg"
    good = image.read_bytes()
    image.write_bytes(b"\xff\xd8broken")
    build()
    from data.manifest import Manifest
    assert [q["id"] for q in Manifest.load(PrepareDataset().stage_dir).quarantine] == [victim]
    image.write_bytes(good)
    build()
    manifest = Manifest.load(PrepareDataset().stage_dir)
    assert manifest.quarantine == [] and victim in manifest.splits["train"]
    assert len(RUNS) == 2 and RUNS[0] != RUNS[1]

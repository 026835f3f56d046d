"""A full disk (ENOSPC): exit 30 with an error naming the path and the space, the temporary output removed,
nothing published, and the HDF5 writer's abort path never raising again (issue 15)."""

from __future__ import annotations

import errno
from pathlib import Path

import luigi
import luigi.retcodes
import numpy as np
import pytest

import data.dense
from data.dense import DenseMapWriter
from data.io import DiskFullError, write_label_png
from pipeline.framework import StageTask


class WritesLabelsOnAFullDisk(StageTask):
    """A stage whose label PNG hits ENOSPC half-way through its output."""

    def compute(self, out_dir: Path) -> dict:
        (out_dir / "first.json").write_text("{}")
        write_label_png(out_dir / "labels" / "a.png", np.zeros((4, 4), np.uint8), np.zeros((256, 3), np.uint8))
        return {}


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def leftovers(directory: Path) -> list[Path]:
    return sorted(directory.iterdir()) if directory.is_dir() else []


def test_a_full_disk_fails_the_stage_with_exit_30_naming_the_path(luigi_config, monkeypatch, tmp_path):
    from PIL import Image
    monkeypatch.setattr(Image.Image, "save", no_space)
    task = WritesLabelsOnAFullDisk()
    with pytest.raises(DiskFullError, match=rf"{task.stage_dir.name}\.tmp-.*no space left on device while writing "
                                            r".*had written 0\.0 MiB and needs more \(.* MiB free"):
        task.run()
    assert leftovers(task.stage_dir.parent) == []        # the temporary directory is gone, nothing published

    with pytest.raises(SystemExit) as exit_info:
        luigi.retcodes.run_with_retcodes(["--module", __name__, "WritesLabelsOnAFullDisk", "--local-scheduler",
                                          "--no-lock"])
    assert exit_info.value.code == 30
    assert not task.output().exists() and leftovers(task.stage_dir.parent) == []


def test_the_dense_writer_refuses_a_write_the_disk_cannot_hold(tmp_path, monkeypatch):
    """libhdf5 meets ENOSPC while evicting its cache, where h5py can only ignore it, and then crashes (exit 139 on
    a 512 KiB tmpfs): the writer checks the free space first."""
    monkeypatch.setattr(data.dense, "free_bytes", lambda path: 3 * 2**20)
    target = tmp_path / "shard.h5"
    with pytest.raises(DiskFullError, match=r"shard\.h5: not enough disk space to write image 'img1': it needs up "
                                            r"to 0\.2 MiB .* 3\.0 MiB are free"):
        with DenseMapWriter(target) as writer:
            writer.write("img1", {"cam": np.ones((2, 250, 250), np.float32)})
    assert leftovers(tmp_path) == []


def test_the_dense_writer_abort_never_raises_again(tmp_path):
    writer = DenseMapWriter(tmp_path / "shard.h5")
    writer.write("img1", {"cam": np.ones((1, 8, 8), np.float32)})
    real_close = writer._file.close

    def close_on_a_full_disk():
        real_close()
        raise OSError(errno.ENOSPC, "No space left on device")

    writer._file.close = close_on_a_full_disk
    writer.abort(OSError(errno.ENOSPC, "No space left on device"))   # returns, no second error
    writer2 = DenseMapWriter(tmp_path / "other.h5")
    writer2.abort()                                                  # no exception given: still quiet
    assert leftovers(tmp_path) == []

"""DDP training of the CAM net: batch sharding, torchrun launch, and 1- vs 2-process loss curves (CPU, gloo)."""

from __future__ import annotations

import csv
import dataclasses
import time
from pathlib import Path

import luigi
import numpy as np
import pytest
import torch
from conftest import run_luigi

from data.manifest import Manifest
from stages.cam import train as train_cam_module
from stages.cam.train import GlobalBatchSampler, check_divisible, parse_progress, read_config, train_cam, write_config
from stages.config import DatasetConfig, TrainCAMConfig
from stages.dataset.prepare import prepare_dataset
from stages.training import distributed

# The brief's tiny recipe: resnet_mini from random weights, 64 px crops, global batch 8 (= 3 steps per epoch
# on the 24 training images of the `tiny` profile).
TINY_CAM = TrainCAMConfig(cam_method="cam", backbone="resnet_mini", pretrained="", freeze_bn=False,
                          num_epochs=2, batch_size=8, resize_long=(56, 96), crop_size=64)


def loss_curve(run_dir: Path) -> list[float]:
    with open(run_dir / "log.csv") as fh:
        return [float(row["loss"]) for row in csv.DictReader(fh)]


def max_relative_gap(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) and a, (a, b)
    return max(abs(x - y) / abs(x) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def tiny_manifest_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("manifest")
    prepare_dataset(DatasetConfig(profile="tiny"), directory, log=lambda *_: None)
    return directory


# ------------------------------------------------------------------------------------------ fast checks

@pytest.mark.parametrize("world", [1, 2, 4])
def test_rank_slices_of_a_step_are_exactly_the_one_process_batch(world):
    n, batch = 27, 8  # 27 = 3 full batches + 3 dropped images (drop_last)
    for epoch in (0, 1):
        single = GlobalBatchSampler(n, batch, seed=5)
        single.set_epoch(epoch)
        ranks = [GlobalBatchSampler(n, batch, seed=5, rank=r, world_size=world) for r in range(world)]
        for sampler in ranks:
            sampler.set_epoch(epoch)
            assert len(sampler) == len(single) == 3
        steps = [[i for piece in slices for i in piece] for slices in zip(*(list(s) for s in ranks))]
        assert steps == list(single)
        assert all(len(b) == batch // world for s in ranks for b in s)
        assert len({i for step in steps for i in step}) == 3 * batch  # no image twice in an epoch
    first, second = GlobalBatchSampler(n, batch, seed=5), GlobalBatchSampler(n, batch, seed=5)
    second.set_epoch(1)
    assert list(first) != list(second)  # a fresh order every epoch


def test_a_batch_that_does_not_split_across_processes_is_refused(monkeypatch, luigi_config, tmp_path):
    with pytest.raises(ValueError, match=r"batch_size = 8 is not divisible by the 3 training processes"):
        check_divisible(8, 3)
    with pytest.raises(ValueError, match="not divisible"):
        GlobalBatchSampler(24, 8, seed=0, rank=0, world_size=3)
    # Inside a (pretend) 3-rank group, train_cam stops before touching data.
    monkeypatch.setattr(train_cam_module.distributed, "world_size", lambda: 3)
    with pytest.raises(ValueError, match="not divisible"):
        train_cam(TINY_CAM, None, tmp_path, torch.device("cpu"))
    monkeypatch.undo()
    # The Luigi stage refuses before launching anything.
    from pipeline.tasks import TrainCAM
    luigi_config("wsss", "train_processes", 3)
    with pytest.raises(ValueError, match=r"\[wsss\] train_processes"):
        TrainCAM().compute(tmp_path)
    assert not any(tmp_path.iterdir())


def test_config_json_round_trip_and_bad_keys(tmp_path):
    write_config(TINY_CAM, tmp_path / "cfg.json")
    assert read_config(tmp_path / "cfg.json") == TINY_CAM  # tuples come back as tuples
    (tmp_path / "bad.json").write_text('{"batch_size": 8, "bach_size": 4}')
    with pytest.raises(ValueError, match=r"bad.json: unknown TrainCAMConfig key\(s\): bach_size"):
        read_config(tmp_path / "bad.json")


def test_ranks_from_the_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.ranks_from_env() == distributed.Ranks(0, 1, 0)
    assert not distributed.launched_by_torchrun()
    assert distributed.init_distributed("cpu") == torch.device("cpu") and not distributed.is_distributed()
    assert distributed.all_reduce_mean(2.5) == 2.5 and distributed.is_main_process()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.ranks_from_env() == distributed.Ranks(1, 2, 1)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="inconsistent"):
        distributed.ranks_from_env()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        distributed.ranks_from_env()


def test_a_failing_torchrun_names_its_log_and_quotes_the_tail(tmp_path):
    log = tmp_path / "logs" / "fail.log"
    lines: list[str] = []
    with pytest.raises(RuntimeError) as info:
        distributed.launch_torchrun(2, "stages.no_such_stage_module", ["--x"], {"WSSS_TEST": "1"}, log,
                                    threads_per_process=1, on_line=lines.append)
    assert any("No module named" in line for line in lines)  # streamed as it came, not only at the end
    message = str(info.value)
    assert str(log) in message and "exited with status" in message
    assert "No module named stages.no_such_stage_module" in message  # the ranks' error, from the log tail
    assert log.read_text().startswith("$ ")


# ------------------------------------------------------------------------------------ torchrun runs

def run_one_process(cfg: TrainCAMConfig, manifest: Manifest, out_dir: Path) -> list[float]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks run on one thread each, too
    try:
        out_dir.mkdir(parents=True)
        train_cam(cfg, manifest, out_dir, torch.device("cpu"), loader_workers=0)
    finally:
        torch.set_num_threads(before)
    return loss_curve(out_dir)


def run_two_processes(cfg: TrainCAMConfig, manifest_dir: Path, work: Path) -> tuple[list[float], dict]:
    from data.io import read_json
    write_config(cfg, work / "cfg.json")
    progress: list[tuple[float, str]] = []
    distributed.launch_torchrun(2, "stages.cam.train",
                                ["--config", work / "cfg.json", "--manifest", manifest_dir,
                                 "--out", work / "two", "--metrics", work / "metrics.json", "--device", "cpu",
                                 "--loader-workers", 0, "--threads", 1],
                                None, work / "torchrun.log", threads_per_process=1,
                                on_line=lambda line: progress.append(parse_progress(line)))
    # Rank 0 alone reports progress, once per epoch.
    assert [p[0] for p in progress if p] == [50.0, 100.0], progress
    return loss_curve(work / "two"), read_json(work / "metrics.json")


@pytest.mark.slow
def test_two_processes_reproduce_one_process_exactly_when_batchnorm_is_frozen(tiny_manifest_dir, tmp_path,
                                                                              monkeypatch):
    """With BN on running statistics every sample's loss and gradient is independent of its batch-mates, so
    DDP over 2 ranks computes the one-process step up to float summation order: the curves agree to ~1e-7
    (measured 3e-8), and so do the weights. Tolerance 1e-5, while a different global batch order moves the
    curve by ~1e-2, so this check pins the sample partitioning exactly."""
    from models.resnet import create_backbone
    torch.manual_seed(1)
    torch.save(create_backbone("resnet_mini").state_dict(), tmp_path / "init.pt")  # stands in for ImageNet
    cfg = dataclasses.replace(TINY_CAM, freeze_bn=True, pretrained=str(tmp_path / "init.pt"))

    started = time.time()
    two, metrics = run_two_processes(cfg, tiny_manifest_dir, tmp_path)
    tiny_manifest = Manifest.load(tiny_manifest_dir)
    two_seconds = time.time() - started
    one = run_one_process(cfg, tiny_manifest, tmp_path / "one")
    print(f"frozen BN: 1 process {one}, 2 processes {two} (torchrun {two_seconds:.1f} s)")
    assert max_relative_gap(one, two) < 1e-5
    assert metrics["steps"] == 2 * 3 and metrics["final_loss"] == pytest.approx(two[-1])
    state_one = torch.load(tmp_path / "one" / "model.pt", weights_only=True)
    state_two = torch.load(tmp_path / "two" / "model.pt", weights_only=True)
    assert max((state_one[k].float() - state_two[k].float()).abs().max().item() for k in state_one) < 1e-4

    # The control: the same run with another global batch order does not pass the same check.
    original_order = train_cam_module.epoch_order
    monkeypatch.setattr(train_cam_module, "epoch_order", lambda n, seed, epoch: original_order(n, seed + 1, epoch))
    shuffled = run_one_process(cfg, tiny_manifest, tmp_path / "shuffled")
    print(f"frozen BN, other batch order: {shuffled}")
    assert max_relative_gap(one, shuffled) > 1e-3


@pytest.mark.slow
def test_luigi_trains_the_cam_net_with_two_processes(luigi_config, tmp_path):
    """[wsss] train_processes = 2 runs TrainCAM under torchrun: same key, a complete stage directory, and the
    loss curve of one process up to per-rank BatchNorm statistics (4 instead of 8 images per normalisation).

    The per-step loss and gradient averaging are exact (see the frozen-BN test), so the only gap is BN batch
    statistics feeding back through the weights; on this recipe it measures 0.06% after epoch 1 and 0.7%
    after epoch 2. Tolerances of 0.5% (epoch 1) and 2% (any epoch) leave about 3-8x margin; a shuffled batch
    order moves epoch 1 by ~2%, beyond the first bound."""
    from data.artifacts import PROVENANCE
    from pipeline.tasks import TrainCAM
    luigi_config("TrainCAM", "pretrained", "")
    assert TrainCAM().config == TINY_CAM
    key_one = TrainCAM().key
    luigi_config("wsss", "train_processes", 2)
    task = TrainCAM()
    assert task.key == key_one  # a runtime setting, never part of the key

    started = time.time()
    result = run_luigi(task)
    seconds = time.time() - started
    assert result.status == luigi.LuigiStatusCode.SUCCESS, result.summary_text
    stage = task.stage_dir
    assert (stage / "model.pt").is_file() and (stage / "log.csv").is_file()
    assert (stage / "train_config.json").is_file() and not (stage / "metrics.tmp.json").exists()
    assert (Path(tmp_path) / "work" / "logs" / f"TrainCAM-{task.key}.torchrun.log").is_file()
    from data.io import read_json
    metrics = read_json(stage / PROVENANCE)["metrics"]
    assert set(metrics) == {"final_loss", "steps", "images", "resumed_from", "seconds"} and metrics["steps"] == 6
    assert metrics["resumed_from"] == 0

    two = loss_curve(stage)
    one = run_one_process(task.config, Manifest.load(task.input_dir("dataset")), tmp_path / "one")
    print(f"per-rank BN: 1 process {one}, 2 processes {two} (Luigi + torchrun {seconds:.1f} s)")
    gaps = [abs(a - b) / a for a, b in zip(one, two)]
    assert gaps[0] < 5e-3 and max(gaps) < 2e-2, gaps
    assert np.isfinite(two).all()

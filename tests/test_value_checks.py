"""Values a run cannot use stop it while it is scheduled, naming the knob and the value; bad files name the file
(issue 15)."""

from __future__ import annotations

import json

import luigi
import pytest
import torch
from conftest import run_luigi

from data.labelspace import LabelSpace
from models.resnet import create_backbone, load_pretrained
from pipeline.tasks import (
    EvalCAM,
    FullWSSS,
    MakeCAM,
    PrepareDataset,
    Propagate,
    TrainAffinity,
    TrainCAM,
    TrainSegmentation,
)


@pytest.mark.parametrize("task, option, value, message", [
    (Propagate, "beta", float("nan"), r"Propagate\.beta = nan: must be a finite number"),
    (Propagate, "bg_threshold", float("inf"), r"Propagate\.bg_threshold = inf: must be a finite number"),
    (EvalCAM, "bg_threshold", -1.0, r"EvalCAM\.bg_threshold = -1\.0: must not be negative"),
    (EvalCAM, "bg_threshold", 5.0, r"EvalCAM\.bg_threshold = 5\.0: must lie in \[0, 1\]"),
    (TrainCAM, "resize_long", (0, 0), r"TrainCAM\.resize_long = \(0, 0\): must be positive"),
    (MakeCAM, "scales", (1.0, 0.0), r"MakeCAM\.scales = \(1\.0, 0\.0\): must be positive"),
    (TrainCAM, "momentum", 1.5, r"TrainCAM\.momentum = 1\.5: must lie in \[0, 1\]"),
])
def test_a_value_out_of_range_fails_while_scheduling_naming_knob_and_value(luigi_config, task, option, value,
                                                                          message):
    with pytest.raises(ValueError, match=message):
        task(**{option: value})


def test_every_preset_value_is_in_range():
    from stages import config as C
    for cls in C.STAGE_CONFIGS.values():
        C.check_ranges(cls())


@pytest.mark.parametrize("content, problem", [
    (b"{\"names\": [\"background\", \"cat\"", "not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b"[\"background\", \"cat\"]", "a mapping with 'names'"),
    (json.dumps({"names": ["background", "cat"], "palette": [[0, 0, 0], [999, 0, 0]]}).encode(),
     r"palette entry 1 = \[999, 0, 0\]"),
])
def test_a_bad_label_space_names_its_file(tmp_path, content, problem):
    path = tmp_path / "classes.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"classes\.json: .*{problem}"):
        LabelSpace.load(path)


@pytest.mark.parametrize("payload", [[1, 2, 3], torch.zeros(3)], ids=["list", "tensor"])
def test_a_weights_file_that_is_no_state_dict_names_the_file(tmp_path, payload):
    path = tmp_path / "weights.pth"
    torch.save(payload, path)
    with pytest.raises(ValueError, match=r"weights\.pth: holds a (list|Tensor), not a state dict"):
        load_pretrained(create_backbone("resnet_mini"), path)


@pytest.mark.parametrize("option, value, message", [
    ("gpu_wait_s", -1.0, r"\[wsss\] gpu_wait_s = -1\.0: must be non-negative"),
    ("gpu_wait_s", float("nan"), r"\[wsss\] gpu_wait_s = nan: must be a finite number"),
    ("loader_workers", -1, r"\[wsss\] loader_workers = -1: must be non-negative"),
    ("torch_threads", -2, r"\[wsss\] torch_threads = -2: must be non-negative"),
    ("train_processes", 0, r"\[wsss\] train_processes = 0: must be at least 1"),
    ("cut_processes", 0, r"\[wsss\] cut_processes = 0: must be at least 1"),
    ("device", "gpu", r"\[wsss\] device = 'gpu'; choose auto, cpu, cuda or cuda:N"),
    ("crf_backend", "fast", r"\[wsss\] crf_backend = 'fast'; choose one of auto, torch, pydensecrf"),
    ("gpus", "0,0", r"\[wsss\] gpus = '0,0' lists a device twice"),
    ("submit_stages", "TrainCAM,Nope", r"\[wsss\] submit_stages names 'Nope'"),
])
def test_a_bad_runtime_setting_fails_while_scheduling_naming_it(luigi_config, option, value, message):
    luigi_config("wsss", option, value)
    with pytest.raises(ValueError, match=message):
        PrepareDataset()


def test_a_work_dir_that_is_a_file_fails_while_scheduling(luigi_config, tmp_path):
    (tmp_path / "taken").write_text("")
    luigi_config("wsss", "work_dir", tmp_path / "taken")
    with pytest.raises(ValueError, match=r"\[wsss\] work_dir = '.*taken': exists and is not a directory"):
        PrepareDataset()


@pytest.mark.parametrize("task, knob", [(TrainCAM, "pretrained"), (TrainSegmentation, "init_checkpoint"),
                                        (TrainAffinity, "pretrained")])
def test_a_missing_weights_file_fails_while_scheduling_naming_knob_and_file(luigi_config, tmp_path, task, knob):
    luigi_config(task.get_task_family(), knob, tmp_path / "no-such.pth")
    with pytest.raises(FileNotFoundError, match=rf"{task.get_task_family()}\.{knob} = '.*no-such\.pth': no such file"):
        task()
    luigi_config(task.get_task_family(), knob, tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"{task.get_task_family()}\.{knob} = .*: not a file"):
        task()


def test_a_missing_weights_file_stops_the_whole_run_before_any_stage(luigi_config, tmp_path):
    luigi_config("TrainSegmentation", "init_checkpoint", tmp_path / "no-such.pth")
    assert run_luigi(FullWSSS()).status != luigi.LuigiStatusCode.SUCCESS
    work = tmp_path / "work"
    assert not work.exists() or not any(work.iterdir()), "no stage ran, not even PrepareDataset"

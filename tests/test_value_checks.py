"""Values a run cannot use stop it while it is scheduled, naming the knob and the value; bad files name the file
(issue 15)."""

from __future__ import annotations

import json

import pytest
import torch

from data.labelspace import LabelSpace
from models.resnet import create_backbone, load_pretrained
from pipeline.tasks import EvalCAM, MakeCAM, Propagate, TrainCAM


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

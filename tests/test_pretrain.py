"""Synthetic pretraining: a deterministic stream apart from the dataset, weights that load like ImageNet's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data import synthetic
from data.artifacts import BACKBONE_WEIGHTS
from models.resnet import create_backbone
from stages.config import PretrainBackboneConfig
from stages.pretrain.train import SyntheticObjects, pretrain_backbone


def test_stream_is_deterministic_single_object_and_apart_from_the_dataset():
    stream = SyntheticObjects(0, "pretrain", 8, 48, flip=False)
    again = SyntheticObjects(0, "pretrain", 8, 48, flip=False)
    for i in range(4):
        image, label = stream[i]
        assert image.shape == (3, 48, 48) and 0 <= label < 10
        assert torch.equal(image, again[i][0]) and label == again[i][1]
    held_out = SyntheticObjects(0, "pretrain-eval", 8, 48, flip=False)
    assert not torch.equal(stream[0][0], held_out[0][0])
    profile = synthetic.pretraining_profile(48)
    dataset_image = synthetic.render_sample(0, "train", 0, profile).image
    assert not np.array_equal(dataset_image, synthetic.render_sample(0, "pretrain", 0, profile).image)
    assert all(len(synthetic.render_sample(0, "pretrain", i, profile).objects) == 1 for i in range(6))


def test_pretraining_beats_chance_and_its_weights_load_as_a_backbone(tmp_path, one_thread):
    cfg = PretrainBackboneConfig(steps=300, batch_size=16, image_size=48, lr=0.05, eval_images=160)
    metrics = pretrain_backbone(cfg, tmp_path, torch.device("cpu"), loader_workers=0)
    # Ten balanced classes: chance is 0.1; a backbone that learned nothing stays near it.
    assert metrics["held_out_accuracy"] > 2 * metrics["chance"], metrics
    log = (tmp_path / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,loss,train_accuracy") and len(log) == 4  # header + steps 100, 200, 300
    saved = torch.load(tmp_path / BACKBONE_WEIGHTS, weights_only=True)
    assert not any(k.startswith("fc.") for k in saved)
    backbone = create_backbone("resnet_mini", pretrained=tmp_path / BACKBONE_WEIGHTS)
    for name, value in backbone.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_pretraining_is_reproducible_from_its_seed(tmp_path, one_thread):
    cfg = PretrainBackboneConfig(steps=4, batch_size=4, image_size=32, eval_images=4)
    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        pretrain_backbone(cfg, tmp_path / name, torch.device("cpu"), loader_workers=0)
        runs.append(torch.load(tmp_path / name / BACKBONE_WEIGHTS, weights_only=True))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_bad_pretraining_config_names_the_key():
    with pytest.raises(KeyError, match="PretrainBackbone.backbone"):
        pretrain_backbone(PretrainBackboneConfig(backbone="vgg"), "unused", torch.device("cpu"))
    with pytest.raises(ValueError, match="PretrainBackbone"):
        pretrain_backbone(PretrainBackboneConfig(steps=0), "unused", torch.device("cpu"))


def test_synthetic_weights_feed_train_cam_and_mismatched_backbones_are_refused(luigi_config):
    from pipeline.tasks import PretrainBackbone, TrainCAM, stage_graph

    assert TrainCAM().upstream()["pretrained"].key == PretrainBackbone().key
    assert "PretrainBackbone" in stage_graph()
    luigi_config("TrainCAM", "pretrained", "")
    assert "pretrained" not in TrainCAM().upstream() and "PretrainBackbone" in stage_graph()  # DeepLab uses it
    luigi_config("TrainSegmentation", "pretrained", "")
    luigi_config("TrainSegmentation", "freeze_bn", "false")
    assert "PretrainBackbone" not in stage_graph()
    luigi_config("TrainCAM", "pretrained", "synthetic")
    luigi_config("TrainCAM", "backbone", "resnet18")
    with pytest.raises(ValueError, match="PretrainBackbone.backbone = resnet18"):
        TrainCAM().upstream()
    json.dumps(PretrainBackboneConfig().__dict__)  # the config is plain data (it enters the key)

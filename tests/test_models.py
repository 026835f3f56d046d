"""Backbones (torchvision key layout, pretrained loading) and the CAM network's IRN recipe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.cam import CAMNet
from models.resnet import BACKBONES, create_backbone
from stages.cam.infer import multiscale_cam

# Key names and shapes of torchvision's resnet50 (checked against torchvision 0.2x): a sample.
TORCHVISION_R50 = {
    "conv1.weight": (64, 3, 7, 7), "bn1.running_var": (64,), "layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "layer2.3.conv3.weight": (512, 128, 1, 1), "layer3.5.bn2.weight": (256,),
    "layer4.2.conv3.weight": (2048, 512, 1, 1), "layer4.0.downsample.1.running_mean": (2048,),
}


def test_resnet50_state_dict_matches_torchvision_layout():
    state = create_backbone("resnet50").state_dict()
    for key, shape in TORCHVISION_R50.items():
        assert tuple(state[key].shape) == shape, key
    assert sum(v.numel() for k, v in state.items() if "num_batches" not in k and "running" not in k) == 23508032


def test_pretrained_loading_from_user_path(tmp_path):
    source = create_backbone("resnet18")
    state = dict(source.state_dict())
    state["fc.weight"] = torch.zeros(1000, 512)  # a classifier head the backbone ignores
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    loaded = create_backbone("resnet18", pretrained=path)
    assert torch.equal(loaded.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    del state["layer2.0.conv1.weight"]
    torch.save(state, path)
    with pytest.raises(KeyError, match="r18.pth.*missing"):
        create_backbone("resnet18", pretrained=path)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        create_backbone("resnet18", pretrained=tmp_path / "nope.pth")


def test_unknown_backbone_lists_choices():
    with pytest.raises(KeyError, match="resnet50"):
        create_backbone("resnet51")
    assert {"resnet50", "resnet101", "resnet_mini"} <= set(BACKBONES.names())


def test_irn_cam_recipe_freezing_and_output_stride():
    net = CAMNet(create_backbone("resnet50", strides=(1, 2, 2, 1)), 20, freeze_bn=True, frozen_stages=2)
    assert net.backbone.output_stride == 16
    assert net.classifier.bias is None
    net.train()
    assert not net.backbone.layer3[0].bn1.training, "frozen BN stays on running statistics"
    x = torch.randn(1, 3, 64, 64)
    net(x).sum().backward()
    assert net.backbone.layer2[0].conv1.weight.grad is None and net.backbone.conv1.weight.grad is None
    assert net.backbone.layer3[0].conv1.weight.grad is not None
    _, head = net.param_groups()
    assert head["lr_mult"] == 10 and len(head["params"]) == 1
    from stages.training.optim import make_optimizer
    opt = make_optimizer(net.param_groups(), lr=0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 1.0]
    assert all(p.requires_grad for g in opt.param_groups for p in g["params"]), "frozen stages stay out"
    assert net.cam(x).shape == (1, 20, 4, 4)


def test_multiscale_cam_shapes_and_normalisation():
    torch.manual_seed(0)
    net = CAMNet(create_backbone("resnet_mini"), 10, freeze_bn=False, frozen_stages=0).eval()
    rgb = np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    low, high = multiscale_cam(net, rgb, [2, 7], (1.0, 0.5, 1.5), True, net.backbone.output_stride,
                               torch.device("cpu"))
    assert low.shape == (2, 10, 14) and high.shape == (2, 37, 53)  # ceil(H/4) x ceil(W/4); full size
    assert np.all(high >= 0) and np.allclose(high.max(axis=(1, 2)), 1, atol=1e-3)
    # Restricting to GT classes keeps their order: keys [7, 2] give the planes of [2, 7] swapped.
    _, swapped = multiscale_cam(net, rgb, [7, 2], (1.0, 0.5, 1.5), True, net.backbone.output_stride,
                                torch.device("cpu"))
    np.testing.assert_allclose(swapped[::-1], high, atol=1e-6)


def test_frozen_recipe_without_weights_is_refused():
    from stages.config import TrainCAMConfig, validate
    with pytest.raises(ValueError, match="TrainCAM.pretrained"):
        validate(TrainCAMConfig(backbone="resnet50", freeze_bn=True, frozen_stages=2, pretrained=""))

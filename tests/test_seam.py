"""ResNet-38 (PSA/SEAM key layout, freezing, taps), SEAM's PCM and losses, and SEAM through train/make CAM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.resnet import BACKBONES, create_backbone
from models.seam import (
    PixelCorrelationModule,
    SEAMNet,
    keep_fg_max,
    max_norm,
    min_pool_loss,
    seam_loss,
    top_fraction_mean,
)
from stages.cam.infer import multiscale_cam

# Keys and shapes of the converted ImageNet file ilsvrc-cls_rna-a1_cls1000_ep-0001.pth (a sample).
RESNET38_KEYS = {
    "conv1a.weight": (64, 3, 3, 3),
    "b2.bn_branch2a.weight": (64,), "b2.conv_branch2a.weight": (128, 64, 3, 3),
    "b2.conv_branch1.weight": (128, 64, 1, 1), "b2_1.conv_branch2b1.weight": (128, 128, 3, 3),
    "b4_5.bn_branch2b1.running_var": (512,),
    "b5.conv_branch2a.weight": (512, 512, 3, 3), "b5.conv_branch1.weight": (1024, 512, 1, 1),
    "b5_2.conv_branch2b1.weight": (1024, 512, 3, 3),
    "b6.conv_branch2a.weight": (512, 1024, 1, 1), "b6.conv_branch2b1.weight": (1024, 512, 3, 3),
    "b6.bn_branch2b2.weight": (1024,), "b6.conv_branch2b2.weight": (2048, 1024, 1, 1),
    "b7.conv_branch1.weight": (4096, 2048, 1, 1), "bn7.running_mean": (4096,),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_resnet38_key_layout_and_no_shortcut_on_same_shape():
    state = create_backbone("resnet38").state_dict()
    for key, shape in RESNET38_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    assert "b2_1.conv_branch1.weight" not in state and "b5_1.conv_branch1.weight" not in state
    assert not any(k.endswith(".bias") and "bn" not in k for k in state), "every conv is bias-free"
    assert {"resnet38", "resnet38_mini"} <= set(BACKBONES.names())


def test_resnet38_mini_taps_are_stride_8():
    net = create_backbone("resnet38_mini").eval()
    feats = net.taps(torch.randn(1, 3, 60, 44))
    assert net.output_stride == 8 and len(feats) == 3
    assert [f.shape[1] for f in feats] == net.tap_channels
    assert all(f.shape[-2:] == (8, 6) for f in feats)  # ceil(60/8), ceil(44/8)
    assert feats[2].min() >= 0, "conv6 is the bn7-ReLU output"
    with pytest.raises(ValueError, match="fixed layout"):
        create_backbone("resnet38_mini", strides=(1, 2, 1, 1))


def test_resnet38_loads_saved_state_dict_and_names_file_on_bad_keys(tmp_path):
    source = create_backbone("resnet38_mini")
    # The reference file predates num_batches_tracked and carries a classifier: both must be tolerated.
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["linear1000.weight"] = torch.zeros(1000, 512)
    path = tmp_path / "r38.pth"
    torch.save(state, path)
    loaded = create_backbone("resnet38_mini", pretrained=path)
    assert torch.equal(loaded.b6.conv_branch2b1.weight, source.b6.conv_branch2b1.weight)
    assert torch.equal(loaded.bn7.running_var, source.bn7.running_var)
    renamed = {k.replace("conv_branch2a", "conv2a"): v for k, v in state.items()}
    torch.save(renamed, path)
    with pytest.raises(KeyError, match=r"r38\.pth.*missing.*ResNet-38d key layout"):
        create_backbone("resnet38_mini", pretrained=path)
    torch.save(create_backbone("resnet_mini").state_dict(), path)
    with pytest.raises(KeyError, match=r"r38\.pth"):
        create_backbone("resnet38_mini", pretrained=path)


def test_resnet38_freezing_recipe():
    net = SEAMNet(create_backbone("resnet38_mini"), 5, freeze_bn=True, frozen_stages=2)
    net.train()
    backbone = net.backbone
    assert not backbone.b4.bn_branch2a.training and net.dropout.training
    assert not backbone.bn7.weight.requires_grad and not backbone.conv1a.weight.requires_grad
    assert not backbone.b2_2.conv_branch2b1.weight.requires_grad and backbone.b3.conv_branch2a.weight.requires_grad
    running = backbone.b5.bn_branch2a.running_mean.clone()
    loss, _ = net.training_loss(torch.randn(2, 3, 48, 48), torch.tensor([[1.0, 0, 0, 0, 1], [0, 1, 0, 0, 0]]))
    loss.backward()
    assert torch.equal(running, backbone.b5.bn_branch2a.running_mean), "frozen BN keeps its statistics"
    assert backbone.b3.conv_branch2a.weight.grad is not None and backbone.b2.conv_branch2a.weight.grad is None


def test_pcm_columns_sum_to_one_and_no_gradient_reaches_backbone():
    torch.manual_seed(0)
    net = SEAMNet(create_backbone("resnet38_mini"), 4, freeze_bn=False, frozen_stages=0).eval()
    x = torch.randn(1, 3, 40, 40)
    conv4, conv5, _ = net.backbone.taps(x)
    aff = net.pcm.affinity(x, conv4, conv5)
    assert aff.shape == (1, 25, 25) and aff.min() >= 0
    torch.testing.assert_close(aff.sum(dim=1), torch.ones(1, 25), atol=1e-4, rtol=0)
    # PCM losses reach only the PCM's projections, never the backbone or the head.
    _, rv = net.maps(x)
    rv.sum().backward()
    assert net.pcm.f9.weight.grad is not None and net.pcm.f8_3.weight.grad is not None
    assert all(p.grad is None for p in net.backbone.parameters()) and net.classifier.weight.grad is None


def test_pcm_seed_is_max_normalised_one_hot_with_background():
    cam = torch.tensor([[[[2.0, -1.0]], [[4.0, 1.0]], [[1.0, 3.0]]]], requires_grad=True)  # (1, 3, 1, 2)
    seed = PixelCorrelationModule.seed(cam)
    assert not seed.requires_grad
    # fg max-normalised: class 1 -> [1, .25], class 2 -> [1/3, 1]; bg = 1 - max fg; non-max fg zeroed.
    expected = torch.tensor([[[[0.0, 0.0]], [[1.0, 0.0]], [[0.0, 1.0]]]])
    torch.testing.assert_close(seed, expected, atol=1e-4, rtol=0)


def test_min_pool_and_ecr_top_k_by_hand():
    # Per-pixel max over classes: [5, -1, 0.5, 2, 0.1, 3, 4, 0.2]; the weakest 25 % (2 px) are -1 and 0.1.
    fg = torch.tensor([5.0, -1.0, 0.5, 2.0, 0.1, 3.0, 4.0, 0.2]).view(1, 1, 2, 4)
    fg = torch.cat([fg, fg - 10], dim=1)
    assert min_pool_loss(fg, 0.25).item() == pytest.approx((0.0 + 0.1) / 2)
    errors = torch.tensor([[0.1, 0.9, 0.3, 0.7, 0.5], [1.0, 0.0, 0.0, 0.0, 0.2]])
    # Top 40 % = 2 entries per sample: (0.9 + 0.7 + 1.0 + 0.2) / 4.
    assert top_fraction_mean(errors, 0.4).item() == pytest.approx(0.7)
    onehot = keep_fg_max(torch.tensor([[[[0.3]], [[0.2]], [[0.6]], [[0.6]]]]))
    assert onehot.flatten().tolist() == pytest.approx([0.3, 0.0, 0.6, 0.6]), "bg kept, ties kept, others 0"


def test_max_norm_matches_definition():
    p = torch.tensor([[[[-1.0, 1.0], [3.0, 5.0]]]])
    # ReLU -> [0, 1, 3, 5]; min 0, max 5 -> relu(v - 1e-5) / (5 + 1e-5).
    expected = F.relu(torch.tensor([0.0, 1, 3, 5]) - 1e-5) / (5 + 1e-5)
    torch.testing.assert_close(max_norm(p).flatten(), expected)


def test_seam_loss_terms_by_hand():
    torch.manual_seed(1)
    labels = torch.tensor([[1.0, 0.0]])
    cam1, rv1 = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    cam2, rv2 = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    loss, parts = seam_loss(cam1, rv1, cam2, rv2, labels, min_pool=0.25, ecr_top=0.2)
    y = torch.tensor([1.0, 1.0, 0.0]).view(1, 3, 1, 1)
    cls = sum(F.multilabel_soft_margin_loss(c.mean(dim=(2, 3))[:, 1:], labels) for c in (cam1, cam2)) / 2
    torch.testing.assert_close(parts["cls"], cls)
    c1 = F.interpolate(max_norm(cam1), (4, 4), mode="bilinear", align_corners=True) * y
    c2 = max_norm(cam2) * y
    torch.testing.assert_close(parts["er"], (c1[:, 1:] - c2[:, 1:]).abs().mean())
    # ECR of branch 1 by hand: target from c2 with bg = 1 - max fg and only class 1 present (it is the max).
    target2 = torch.cat([1 - c2[:, 1:2], c2[:, 1:2], torch.zeros_like(c2[:, 2:])], dim=1)
    r1 = F.interpolate(max_norm(rv1), (4, 4), mode="bilinear", align_corners=True) * y
    ecr1 = (target2 - r1).abs().flatten().topk(int(3 * 16 * 0.2)).values.mean()
    target1 = torch.cat([1 - c1[:, 1:2], c1[:, 1:2], torch.zeros_like(c1[:, 2:])], dim=1)
    ecr2 = (target1 - max_norm(rv2) * y).abs().flatten().topk(9).values.mean()
    torch.testing.assert_close(parts["ecr"], ecr1 + ecr2)
    torch.testing.assert_close(loss, parts["cls"] + parts["min"] + parts["er"] + parts["ecr"])


def test_seam_param_groups_follow_psa_convention():
    net = SEAMNet(create_backbone("resnet38_mini"), 3, freeze_bn=False, frozen_stages=0)
    groups = net.param_groups(10.0)
    assert [(g["lr_mult"], g["decay"]) for g in groups] == [(1, True), (2, False), (10, True), (20, False)]
    assert {id(p) for p in groups[2]["params"]} == {id(p) for m in (net.classifier, net.pcm) for p in m.parameters()}
    assert all(p.ndim == 1 for p in groups[1]["params"]) and not groups[3]["params"], "SEAM's new layers are bias-free"
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))


def test_seam_training_step_runs_and_is_finite():
    torch.manual_seed(0)
    net = SEAMNet(create_backbone("resnet38_mini"), 4, freeze_bn=False, frozen_stages=0).train()
    from stages.training.optim import make_optimizer
    opt = make_optimizer(net.param_groups(), lr=0.01, weight_decay=5e-4)
    images, labels = torch.randn(2, 3, 64, 64), torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1]])
    before = net.pcm.f9.weight.detach().clone()
    loss, parts = net.training_loss(images, labels)
    assert set(parts) == {"cls", "min", "er", "ecr"} and all(torch.isfinite(v) for v in parts.values())
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, net.pcm.f9.weight)


def test_seam_on_a_resnet_uses_its_last_three_stages_and_refuses_freezing():
    from stages.cam.seam import build as build_seam
    from stages.config import TrainCAMConfig

    net = build_seam(TrainCAMConfig(cam_method="seam", backbone="resnet_mini"), 4).eval()
    assert net.pcm.f8_3.in_channels == 32 and net.pcm.f8_4.in_channels == 64  # layer2, layer3 of resnet_mini
    cam = net.cam(torch.randn(1, 3, 64, 80))
    assert cam.shape == (1, 4, 8, 10)  # stride 8
    loss, _ = net.train().training_loss(torch.randn(2, 3, 64, 64), torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]]))
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="last two strides 1"):
        build_seam(TrainCAMConfig(cam_method="seam", backbone="resnet_mini", strides=(1, 2, 2, 1)), 4)
    with pytest.raises(ValueError, match="freezes only ResNet-38"):
        SEAMNet(create_backbone("resnet_mini"), 4, freeze_bn=True, frozen_stages=0)


def test_make_cam_on_seam_gives_min_max_normalised_maps():
    torch.manual_seed(0)
    net = SEAMNet(create_backbone("resnet38_mini"), 6, freeze_bn=False, frozen_stages=0).eval()
    rgb = np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    low, high = multiscale_cam(net, rgb, [2, 5], (1.0, 0.5), True, net.backbone.output_stride, torch.device("cpu"))
    assert low.shape == (2, 10, 14) and high.shape == (2, 37, 53)
    for maps in (low, high):
        assert maps.min() >= 0 and maps.max() <= 1
        flat = maps.reshape(2, -1)
        assert np.allclose(flat.max(axis=1), 1, atol=1e-3) and np.all(flat.min(axis=1) == 0)


def seam_reference_cam(net: SEAMNet, rgb: np.ndarray, keys: list[int], scales: tuple[float, ...]) -> np.ndarray:
    """infer_SEAM.py's order, pass by pass: the network's PCM output at the scaled size (align_corners=True),
    to the image size (align_corners=False), mirrored back after resizing; summed, ReLU, per-class min-max."""
    from data.transforms import normalize, rescale
    h, w = rgb.shape[:2]
    total = 0
    for scale in scales:
        image = torch.from_numpy(normalize(rescale(rgb, scale)))[None]
        for mirrored in (False, True):
            with torch.no_grad():
                _, cam_rv = net(image.flip(-1) if mirrored else image)
            cam = F.interpolate(cam_rv[:, 1:], (h, w), mode="bilinear", align_corners=False)[0]
            cam = cam[[k - 1 for k in keys]].numpy()
            total = total + (cam[..., ::-1] if mirrored else cam)
    total = np.maximum(total, 0)
    lo, hi = total.min(axis=(1, 2), keepdims=True), total.max(axis=(1, 2), keepdims=True)
    total[total < lo + 1e-5] = 0
    return (total - lo - 1e-5) / (hi - lo + 1e-5)


def test_make_cam_on_seam_follows_infer_seam_order():
    """Two-step resize, mirror after resizing (SEAM); IRN's one-step pad-and-crop order gives other maps."""
    torch.manual_seed(0)
    net = SEAMNet(create_backbone("resnet38_mini"), 6, freeze_bn=False, frozen_stages=0).eval()
    rgb = np.random.default_rng(1).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    scales = (1.0, 0.5, 1.5)
    _, high = multiscale_cam(net, rgb, [2, 5], scales, True, 8, torch.device("cpu"))
    reference = seam_reference_cam(net, rgb, [2, 5], scales)
    np.testing.assert_allclose(high, np.maximum(reference, 0), atol=1e-4)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(net, "cam_upsampling", "irn", raising=False)
        _, irn_order = multiscale_cam(net, rgb, [2, 5], scales, True, 8, torch.device("cpu"))
    assert np.abs(irn_order - reference).max() > 1e-2


def test_color_jitter_zero_draws_nothing_and_positive_changes_colours():
    from data.transforms import color_jitter, train_transform
    rgb = np.random.default_rng(3).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    plain = train_transform(rgb, (20, 40), 16, np.random.default_rng(7))
    same = train_transform(rgb, (20, 40), 16, np.random.default_rng(7), jitter=0.0)
    assert np.array_equal(plain, same)
    jittered = color_jitter(rgb, 0.3, np.random.default_rng(1))
    assert jittered.dtype == np.uint8 and jittered.shape == rgb.shape and not np.array_equal(jittered, rgb)
    assert np.array_equal(color_jitter(rgb, 0.3, np.random.default_rng(1)), jittered), "rng-determined"


def test_train_cam_with_seam_logs_loss_parts_and_make_cams(tmp_path):
    import csv

    from data.dense import DenseMapReader, DenseMapWriter
    from stages.cam.infer import make_cams
    from stages.cam.methods import load_cam_model
    from stages.cam.train import train_cam
    from stages.config import DatasetConfig, TrainCAMConfig
    from stages.dataset.prepare import prepare_dataset

    manifest = prepare_dataset(DatasetConfig(profile="tiny"), tmp_path / "data", log=lambda m: None)
    cfg = TrainCAMConfig(cam_method="seam", backbone="resnet38_mini", num_epochs=1, batch_size=8,
                         resize_long=(56, 96), crop_size=48, color_jitter=0.3)
    result = train_cam(cfg, manifest, tmp_path, torch.device("cpu"), loader_workers=0)
    with open(tmp_path / "log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert result["steps"] == len(manifest.splits["train"]) // 8 and len(rows) == 1
    assert all(np.isfinite(float(rows[0][f"loss_{p}"])) for p in ("cls", "min", "er", "ecr"))
    model = load_cam_model(cfg, manifest.label_space.num_classes - 1, tmp_path, torch.device("cpu"))
    ids = manifest.splits["eval"][:2]
    writer = DenseMapWriter(tmp_path / "cams.h5")
    make_cams(model, manifest, ids, writer, (1.0, 0.5), True, torch.device("cpu"))
    writer.close()
    arrays, attrs = DenseMapReader([tmp_path / "cams.h5"]).read(ids[0], ["cam", "high_res"])
    h, w = manifest.layout.read_image(ids[0]).shape[:2]
    assert arrays["high_res"].shape == (len(attrs["keys"]), h, w)
    assert arrays["cam"].shape == (len(attrs["keys"]), -(-h // 4), -(-w // 4))
    with pytest.raises(ValueError, match="TrainCAM.strides"):
        train_cam(TrainCAMConfig(cam_method="seam", backbone="resnet_mini", strides=(1, 2, 2, 1), batch_size=8),
                  manifest, tmp_path, torch.device("cpu"), loader_workers=0)


def test_psa_cam_net_trains_its_head_and_late_blocks_and_gives_stride_8_cams(tmp_path):
    from data.dense import DenseMapReader, DenseMapWriter
    from models.cam import PSACAMNet
    from stages.cam.infer import make_cams
    from stages.cam.methods import build_cam_model, load_cam_model
    from stages.cam.train import train_cam
    from stages.config import DatasetConfig, TrainCAMConfig
    from stages.dataset.prepare import prepare_dataset

    net = build_cam_model(TrainCAMConfig(cam_method="psa", backbone="resnet38_mini", freeze_bn=True,
                                         frozen_stages=2), 5)
    assert isinstance(net, PSACAMNet) and net.classifier.bias is None
    for name in ("conv1a", "b2", "b2_1", "b2_2"):   # PSA's not_training list, and every BN
        assert not any(p.requires_grad for p in getattr(net.backbone, name).parameters()), name
    assert any(p.requires_grad for p in net.backbone.b3.parameters())
    groups = net.param_groups(10.0)
    assert [g["lr_mult"] for g in groups] == [1.0, 2.0, 10.0, 20.0]
    assert any(p is net.classifier.weight for p in groups[2]["params"])
    x = torch.randn(2, 3, 64, 48)
    assert net(x).shape == (2, 5) and net.eval().cam(x).shape == (2, 5, 8, 6)
    with pytest.raises(ValueError, match="ResNet-38"):
        build_cam_model(TrainCAMConfig(cam_method="psa", backbone="resnet_mini"), 5)

    manifest = prepare_dataset(DatasetConfig(profile="tiny"), tmp_path / "data", log=lambda m: None)
    cfg = TrainCAMConfig(cam_method="psa", backbone="resnet38_mini", num_epochs=1, batch_size=8,
                         resize_long=(56, 96), crop_size=48, color_jitter=0.3)
    result = train_cam(cfg, manifest, tmp_path, torch.device("cpu"), loader_workers=0)
    assert np.isfinite(result["final_loss"])
    model = load_cam_model(cfg, manifest.label_space.num_classes - 1, tmp_path, torch.device("cpu"))
    writer = DenseMapWriter(tmp_path / "cams.h5")
    make_cams(model, manifest, manifest.splits["eval"][:1], writer, (1.0, 0.5), True, torch.device("cpu"))
    writer.close()
    arrays, _ = DenseMapReader([tmp_path / "cams.h5"]).read(manifest.splits["eval"][0], ["high_res"])
    assert arrays["high_res"].max() <= 1.0 + 1e-6   # IRN/PSA's per-class max normalisation

"""DSRG / DGCN seed-net training: the loop, resume after a kill, predictions, config plumbing."""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest
import torch
from scipy import ndimage

from models.segmenters import create_segmenter
from pipeline.checks import validate_config as validate
from stages.config import TrainSeedNetConfig, all_knobs
from stages.seed_net.graphcut import DGCNConfig
from stages.seed_net.growing import DSRGConfig
from stages.seed_net.train import (
    build_seed_net,
    label_update_config,
    load_seed_net,
    lr_factor,
    optimizer_groups,
    predict_seed_net,
    train_seed_net,
)

CPU = torch.device("cpu")
TINY = TrainSeedNetConfig(iterations=40, batch_size=4, crop_size=64, lr=1e-3, freeze_bn=False, schedule="poly",
                          warmup_iterations=0, checkpoint_every=2, predict_scales=(0.75, 1.0))


def sparse_seeds(manifest):
    """Seeds from GT: each class region eroded by 2 pixels, then only every third row and column kept."""
    def seeds_of(image_id: str) -> np.ndarray:
        gt = manifest.layout.read_label(image_id)
        seeds = np.full(gt.shape, 255, np.uint8)
        lattice = np.zeros(gt.shape, bool)
        lattice[::3, ::3] = True
        for c in np.unique(gt[gt != 255]):
            seeds[ndimage.binary_erosion(gt == c, iterations=2) & lattice] = c
        return seeds
    return seeds_of


def read_log(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------------------------------------------------
# Configuration


def test_default_knobs_reproduce_the_reference_update_configs():
    assert label_update_config(TrainSeedNetConfig(method="graphcut")) == DGCNConfig()
    assert label_update_config(TrainSeedNetConfig(method="dsrg")) == DSRGConfig()
    tuned = label_update_config(TrainSeedNetConfig(method="dsrg", dsrg_bg_threshold=0.9, dsrg_fg_threshold=0.6,
                                                   crf_unary="log", crf_iterations=3))
    assert (tuned.bg_threshold, tuned.fg_threshold, tuned.crf.unary, tuned.crf.iterations) == (0.9, 0.6, "log", 3)
    cut = label_update_config(TrainSeedNetConfig(dgcn_k=5, dgcn_seed_capacity=4.0, dgcn_update_threshold=0.6))
    assert (cut.k, cut.seed_capacity, cut.update_threshold, cut.crf.unary) == (5, 4.0, 0.6, "log")
    assert "TrainSeedNet" in all_knobs() and all_knobs()["TrainSeedNet"]["dgcn_k"] == 10


def test_step_schedule_warms_up_then_decays_every_three_epochs_and_poly():
    cfg = TrainSeedNetConfig(iterations=100, warmup_iterations=4, step_gamma=0.3, step_epochs=3)
    per_epoch = 5
    assert [lr_factor(cfg, i, per_epoch) for i in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_factor(cfg, 14, per_epoch) == 1.0
    assert lr_factor(cfg, 15, per_epoch) == pytest.approx(0.3)
    assert lr_factor(cfg, 30, per_epoch) == pytest.approx(0.09)
    every_7 = dataclasses.replace(cfg, step_iterations=7, warmup_iterations=0)
    assert lr_factor(every_7, 6, per_epoch) == 1.0 and lr_factor(every_7, 7, per_epoch) == pytest.approx(0.3)
    poly = dataclasses.replace(cfg, schedule="poly", warmup_iterations=0)
    assert lr_factor(poly, 50, per_epoch) == pytest.approx(0.5 ** 0.9)


def test_head_is_10x_with_its_bias_unless_deeplab_groups_are_asked_for():
    net = create_segmenter("deeplabv2", "resnet_mini", 4, freeze_bn=False)
    groups = optimizer_groups(net, TINY)
    assert sorted(g["lr_mult"] for g in groups) == [1.0, 10.0]
    head = next(g for g in groups if g["lr_mult"] == 10.0)
    assert {id(p) for p in head["params"]} == {id(p) for p in net.aspp.parameters()}
    assert head.get("decay", True)
    deeplab = optimizer_groups(net, dataclasses.replace(TINY, head_bias_20x=True))
    assert sorted(g["lr_mult"] for g in deeplab) == [1.0, 10.0, 20.0]


@pytest.mark.parametrize("change, message", [
    ({"method": "alpha_expansion"}, "TrainSeedNetConfig.method"),
    ({"schedule": "cosine"}, "TrainSeedNetConfig.schedule"),
    ({"model": "deeplabv3plus"}, "graphcut needs deeplabv2"),
    ({"freeze_bn": True}, "freeze_bn"),
    ({"dsrg_fg_threshold": 1.5}, "dsrg_fg_threshold"),
    ({"dsrg_connectivity": 6}, "dsrg_connectivity"),
    ({"step_gamma": 0.0}, "step_gamma"),
    ({"predict_scales": ()}, "predict_scales"),
    ({"iterations": 0}, "iterations"),
    ({"head": "largefov"}, "TrainSeedNet.head"),
    ({"method": "dsrg", "model": "deeplabv3plus", "head": "dilated12"}, "replaces deeplabv2's ASPP"),
    ({"bn_mode": "sync"}, "TrainSeedNet.bn_mode"),
    ({"bn_mode": "batch_stats"}, "needs freeze_bn = true"),
])
def test_bad_config_names_the_key(change, message):
    with pytest.raises(ValueError, match=message):
        validate(dataclasses.replace(TINY, **change))


def test_unknown_backbone_names_the_key():
    with pytest.raises(KeyError, match="TrainSeedNet.backbone"):
        validate(dataclasses.replace(TINY, backbone="vgg7"))
    validate(TINY)


def test_bad_inputs_are_rejected(tiny_manifest, tmp_path, one_thread):
    ids = tiny_manifest.splits["train"]
    seeds = sparse_seeds(tiny_manifest)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        train_seed_net(TINY, tiny_manifest, ids[:3], seeds, tmp_path, CPU)
    with pytest.raises(ValueError, match="processes"):
        train_seed_net(TINY, tiny_manifest, ids, seeds, tmp_path, CPU, processes=0)
    absent = {i: next(c for c in range(1, 11) if c not in tiny_manifest.image_labels[i]) for i in ids}

    def wrong_class(image_id):
        s = seeds(image_id)
        s[0, 0] = absent[image_id]
        return s
    with pytest.raises(ValueError, match="seeds of image .* hold classes"):
        train_seed_net(TINY, tiny_manifest, ids, wrong_class, tmp_path, CPU)
    with pytest.raises(ValueError, match="seeds of image .* are"):
        train_seed_net(TINY, tiny_manifest, ids, lambda i: seeds(i)[1:], tmp_path, CPU)


# ----------------------------------------------------------------------------------------------------------------
# Model


def test_node_features_are_layer1_on_the_layer3_grid_plus_layer3(one_thread):
    net = create_segmenter("deeplabv2", "resnet_mini", 5, freeze_bn=False).eval()
    x = torch.randn(2, 3, 48, 64)
    logits, features = net.forward_with_features(x)
    assert torch.equal(logits, net(x))
    assert features.shape == (2, net.node_feature_channels, 6, 8) and net.node_feature_channels == 16 + 64
    layer1, _, layer3, _ = net.backbone(x)
    assert torch.equal(features[:, 16:], layer3)
    assert torch.allclose(features[:, :16, 0, 0], layer1[:, :, 0, 0])        # corners aligned
    assert torch.allclose(features[:, :16, -1, -1], layer1[:, :, -1, -1])


def test_dilated12_head_is_one_dilation_12_classifier(one_thread):
    """DGCN's layer5: a single 3x3 conv of dilation 12 (padding 12, bias) on the last stage, output stride 8."""
    net = build_seed_net(dataclasses.replace(TINY, head="dilated12"), 5)
    (conv,) = net.aspp.branches
    assert (conv.kernel_size, conv.dilation, conv.padding) == ((3, 3), (12, 12), (12, 12))
    assert conv.bias is not None and conv.in_channels == net.backbone.channels[-1] and conv.out_channels == 5
    assert len(build_seed_net(TINY, 5).aspp.branches) == 4                # default: DeepLab-v2's ASPP
    x = torch.randn(2, 3, 48, 64)
    logits, _ = net.eval().forward_with_features(x)
    assert logits.shape == (2, 5, 6, 8)
    torch.testing.assert_close(logits, conv(net.backbone(x)[-1]))


def bn_layers(net: torch.nn.Module) -> list[torch.nn.BatchNorm2d]:
    return [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]


@pytest.mark.parametrize("bn_mode", ["batch_stats", "frozen"])
def test_bn_mode_batch_stats_normalises_with_the_batch_and_keeps_affine_fixed(bn_mode, one_thread):
    """DGCN's BN: the net in train mode uses (and tracks) batch statistics while its affine parameters, out of the
    optimiser, stay put; ``frozen`` keeps the running statistics too."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, freeze_bn=True, bn_mode=bn_mode, pretrained="unused")
    net = build_seed_net(cfg, 4, pretrained=False).train()
    for bn in bn_layers(net):                                           # pretrained-like, non-trivial values
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
        bn.running_var.fill_(4.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer = torch.optim.SGD([p for g in optimizer_groups(net, cfg) for p in g["params"]], lr=0.1)
    x = torch.randn(4, 3, 48, 64) * 3 + 1
    net(x).square().mean().backward()
    optimizer.step()
    after = net.state_dict()
    bn_names = [name for name, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for name in bn_names:
        for field in ("weight", "bias"):
            assert torch.equal(after[f"{name}.{field}"], before[f"{name}.{field}"]), f"{name}.{field} trained"
    stats_moved = any(not torch.equal(after[f"{name}.running_mean"], before[f"{name}.running_mean"])
                      for name in bn_names)
    assert stats_moved == (bn_mode == "batch_stats")
    assert not torch.equal(after["aspp.branches.0.weight"], before["aspp.branches.0.weight"])
    first = bn_layers(net)[0]
    assert first.training == (bn_mode == "batch_stats")


# ----------------------------------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("method", ["graphcut", "dsrg"])
def test_loss_decreases_and_supervision_grows_beyond_the_seeds(method, tiny_manifest, tmp_path, one_thread):
    cfg = dataclasses.replace(TINY, method=method)
    out = train_seed_net(cfg, tiny_manifest, tiny_manifest.splits["train"], sparse_seeds(tiny_manifest), tmp_path,
                         CPU)
    assert out["iterations"] == 40 and out["method"] == method
    rows = read_log(tmp_path / "log.csv")
    assert list(rows[0]) == ["epoch", "iteration", "loss", "seed_loss", "constrain_loss", "lr", "seed_fraction",
                             "label_fraction", "update_seconds", "seconds"]
    assert [int(r["iteration"]) for r in rows] == list(range(1, 41))
    loss = np.array([float(r["loss"]) for r in rows])
    assert np.isfinite(loss).all()
    # the target regrows every iteration, so single losses jump; the trend over 40 iterations does not
    assert loss[-10:].mean() < 0.75 * loss[:10].mean()
    parts = np.array([[float(r["seed_loss"]), float(r["constrain_loss"])] for r in rows])
    assert np.allclose(parts.sum(1), loss, rtol=1e-5)
    seeds = np.array([float(r["seed_fraction"]) for r in rows])
    labelled = np.array([float(r["label_fraction"]) for r in rows])
    assert (labelled >= seeds).all()
    assert labelled[0] == seeds[0]               # the untrained net is confident nowhere: nothing grows yet
    assert labelled[-10:].mean() > 3 * seeds[-10:].mean()
    assert out["label_fraction"] > out["seed_fraction"]


@pytest.mark.parametrize("method", ["graphcut", "dsrg"])
def test_resume_after_a_kill_gives_identical_weights(method, tiny_manifest, tmp_path, one_thread):
    cfg = dataclasses.replace(TINY, method=method, iterations=6, schedule="step", warmup_iterations=3,
                              step_iterations=4)
    ids, seeds = tiny_manifest.splits["train"], sparse_seeds(tiny_manifest)
    straight = train_seed_net(cfg, tiny_manifest, ids, seeds, tmp_path / "a", CPU)
    killed = train_seed_net(cfg, tiny_manifest, ids, seeds, tmp_path / "b", CPU, resume_dir=tmp_path / "r",
                            stop_after=3)
    assert killed == {"stopped_at": 3} and not (tmp_path / "b" / "model.pt").exists()
    resumed = train_seed_net(cfg, tiny_manifest, ids, seeds, tmp_path / "b", CPU, resume_dir=tmp_path / "r")
    assert resumed["resumed_from"] == 2 and resumed["iterations"] == straight["iterations"] == 6
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_log(tmp_path / "a" / "log.csv")[-1]["loss"] == read_log(tmp_path / "b" / "log.csv")[-1]["loss"]


@pytest.mark.slow
def test_graph_cuts_in_worker_processes_give_the_same_weights(tiny_manifest, tmp_path, one_thread):
    cfg = dataclasses.replace(TINY, iterations=8)
    ids, seeds = tiny_manifest.splits["train"], sparse_seeds(tiny_manifest)
    train_seed_net(cfg, tiny_manifest, ids, seeds, tmp_path / "one", CPU)
    train_seed_net(cfg, tiny_manifest, ids, seeds, tmp_path / "two", CPU, processes=2)
    a = torch.load(tmp_path / "one" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------------------------
# Prediction


def test_predict_restricts_to_the_image_classes_and_sums_logits_over_scales(tiny_manifest, tmp_path, one_thread):
    cfg = dataclasses.replace(TINY, iterations=4)
    train_seed_net(cfg, tiny_manifest, tiny_manifest.splits["train"], sparse_seeds(tiny_manifest), tmp_path, CPU)
    n = tiny_manifest.label_space.num_classes
    model = load_seed_net(cfg, n, tmp_path, CPU)
    image_id = tiny_manifest.splits["train"][0]
    rgb = tiny_manifest.layout.read_image(image_id)
    keys = list(tiny_manifest.image_labels[image_id])
    probs = predict_seed_net(cfg, model, rgb, keys, CPU)
    assert probs.shape == (1 + len(keys), *rgb.shape[:2]) and probs.dtype == np.float32
    assert np.allclose(probs.sum(0), 1.0, atol=1e-5) and (probs >= 0).all()

    # reference: every class's logits at each scale, upsampled and summed; then the image's classes only
    import cv2
    import torch.nn.functional as F

    from data.transforms import normalize
    h, w = rgb.shape[:2]
    total = 0
    with torch.no_grad():
        for s in cfg.predict_scales:
            small = cv2.resize(rgb, (round(w * s), round(h * s)), interpolation=cv2.INTER_LINEAR)
            logits = model(torch.from_numpy(normalize(small))[None])
            total = total + F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)[0]
    expected = total[[0, *keys]].softmax(0).numpy()
    assert np.allclose(probs, expected, atol=1e-5)
    all_classes = total.softmax(0).numpy()
    assert not np.allclose(probs[0], all_classes[0], atol=1e-3)   # the restriction renormalises
    swapped = predict_seed_net(cfg, model, rgb, keys[::-1], CPU)
    assert np.allclose(swapped[1:], probs[1:][::-1], atol=1e-6)
    assert model.training is False
    for bad in ([0], [keys[0], keys[0]], [n]):
        with pytest.raises(ValueError):
            predict_seed_net(cfg, model, rgb, bad, CPU)
    with pytest.raises(FileNotFoundError, match="TrainSeedNet"):
        load_seed_net(cfg, n, tmp_path / "nothing", CPU)

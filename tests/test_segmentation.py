"""DeepLab models, the retraining recipe, resume after a kill, and the deeplab-pytorch metric."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from data.io import BadInputError, read_label_png, write_label_png
from data.labelspace import voc_palette
from models.deeplab import MultiScaleInputs
from models.resnet import create_backbone
from models.segmenters import create_segmenter
from pipeline.checks import validate_config as validate
from stages.config import EvalSegmentationConfig, TrainSegmentationConfig
from stages.metrics import segmentation_scores
from stages.segmentation.model import load_matching, load_segmenter, predict_probs
from stages.segmentation.predict import predict_images
from stages.segmentation.train import (
    SegmentationSet,
    agreed_labels,
    augment,
    batch_schedule,
    nearest_resize,
    segmentation_loss,
    train_segmentation,
)

TINY = TrainSegmentationConfig(iterations=6, batch_size=4, crop_size=48, lr=0.01, checkpoint_every=2,
                               eval_every=1, scales=(0.75, 1.0), freeze_bn=False)


@pytest.mark.parametrize("name, stride", [("deeplabv2", 8), ("deeplabv3plus", 4)])
def test_output_stride_and_msc_outputs(name, stride, one_thread):
    net = create_segmenter(name, "resnet_mini", 5, freeze_bn=True).eval()
    x = torch.randn(1, 3, 64, 96)
    assert net(x).shape == (1, 5, 64 // stride, 96 // stride)
    msc = create_segmenter(name, "resnet_mini", 5, msc=True)
    assert isinstance(msc, MultiScaleInputs)
    outs = msc.train()(x)
    assert len(outs) == 4  # 1x, 0.5x, 0.75x, max
    assert outs[1].shape[-1] < outs[2].shape[-1] < outs[0].shape[-1]
    fused = msc.eval()(x)
    assert fused.shape == outs[0].shape


def test_deeplabv2_aspp_sums_four_dilated_classifiers():
    net = create_segmenter("deeplabv2", "resnet_mini", 3)
    assert [b.dilation[0] for b in net.aspp.branches] == [6, 12, 18, 24]
    feats = torch.randn(1, net.backbone.channels[-1], 9, 9)
    assert torch.allclose(net.aspp(feats), sum(b(feats) for b in net.aspp.branches))


def test_param_groups_follow_deeplab_lr_multipliers():
    net = create_segmenter("deeplabv2", "resnet_mini", 3, freeze_bn=True)
    groups = {g["lr_mult"]: g for g in net.param_groups()}
    assert set(groups) == {1.0, 10.0, 20.0}
    assert {id(p) for p in groups[20.0]["params"]} == {id(b.bias) for b in net.aspp.branches}
    assert groups[20.0]["decay"] is False
    bn = {id(p) for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    assert not bn & {id(p) for g in groups.values() for p in g["params"]}  # frozen BN is not optimised
    trainable_bn = create_segmenter("deeplabv2", "resnet_mini", 3, freeze_bn=False)
    optimised = {id(p) for g in trainable_bn.param_groups() for p in g["params"]}
    assert id(trainable_bn.backbone.bn1.weight) in optimised
    net.train()
    assert all(not m.training for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_imagenet_backbone_weights_load_by_torchvision_keys(tmp_path):
    source = create_backbone("resnet_mini", strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4))
    torch.save(source.state_dict(), tmp_path / "resnet.pth")
    net = create_segmenter("deeplabv3plus", "resnet_mini", 4, pretrained=str(tmp_path / "resnet.pth"))
    assert torch.equal(net.backbone.layer3[0].conv1.weight, source.layer3[0].conv1.weight)


def test_init_checkpoint_loads_matching_weights_and_rejects_other_models(tmp_path):
    coco = create_segmenter("deeplabv2", "resnet_mini", 7)  # another label set: the head stays new
    torch.save(coco.state_dict(), tmp_path / "coco.pth")
    net = create_segmenter("deeplabv2", "resnet_mini", 4)
    left = load_matching(net, tmp_path / "coco.pth")
    assert torch.equal(net.backbone.conv1.weight, coco.backbone.conv1.weight)
    assert left == sorted(k for k in net.state_dict() if k.startswith("aspp."))
    torch.save({"unrelated.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth.*no backbone weight"):
        load_matching(net, tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_matching(net, tmp_path / "missing.pth")


def test_nearest_resize_samples_pixel_centres():
    label = np.arange(16).reshape(4, 4)
    assert nearest_resize(label, (2, 2)).tolist() == [[5, 7], [13, 15]]
    assert nearest_resize(label, (4, 4)).tolist() == label.tolist()


def test_augment_pads_with_ignore_and_keeps_label_aligned():
    cfg = dataclasses.replace(TINY, crop_size=40, scales=(0.5,))
    rgb = np.zeros((30, 30, 3), np.uint8)
    rgb[:, 15:] = 255
    label = np.zeros((30, 30), np.uint8)
    label[:, 15:] = 1
    x, y = augment(rgb, label, cfg, np.random.default_rng(0))
    assert x.shape == (3, 40, 40) and y.shape == (40, 40)
    assert (y == 255).sum() == 40 * 40 - 15 * 15
    bright = x.mean(0) > 0.5
    assert np.array_equal(bright[y != 255], (y == 1)[y != 255])


def test_loss_ignores_255_and_sums_outputs():
    logits = torch.zeros(1, 2, 4, 4, requires_grad=True)
    labels = torch.full((1, 8, 8), 255)
    labels[0, :4, :4] = 1
    single = segmentation_loss(logits, labels)
    assert single.item() == pytest.approx(np.log(2))
    assert segmentation_loss([logits, logits], labels).item() == pytest.approx(2 * np.log(2))


def test_batch_schedule_is_independent_of_the_start():
    whole = batch_schedule(10, 3, seed=1, start=0, stop=9)
    assert batch_schedule(10, 3, seed=1, start=4, stop=9) == whole[4:]
    epoch0 = [j for b in whole[:3] for _, j in b]
    assert len(set(epoch0)) == 9  # one permutation per epoch, the incomplete batch dropped


def test_segmentation_scores_follow_deeplab_pytorch():
    conf = np.array([[5, 1, 0], [2, 2, 0], [0, 3, 0]])  # class 2 in the GT, never predicted
    s = segmentation_scores(conf)
    iou = [5 / 8, 2 / 8, 0.0]
    assert s["miou"] == pytest.approx(np.mean(iou))
    assert s["pixel_accuracy"] == pytest.approx(7 / 13)
    assert s["mean_accuracy"] == pytest.approx(np.mean([5 / 6, 2 / 4, 0]))
    assert s["fwiou"] == pytest.approx(6 / 13 * 5 / 8 + 4 / 13 * 2 / 8)
    only_predicted = np.array([[4, 1], [0, 0]])  # class 1 predicted but absent from the GT: left out
    assert segmentation_scores(only_predicted)["miou"] == pytest.approx(4 / 5)


def test_bad_config_names_the_key():
    with pytest.raises(KeyError, match="TrainSegmentation.model"):
        validate(dataclasses.replace(TINY, model="unet"))
    with pytest.raises(ValueError, match="TrainSegmentation"):
        validate(dataclasses.replace(TINY, accumulation=0))
    with pytest.raises(ValueError, match="freeze_bn"):  # random BN statistics, frozen: never what one wants
        validate(dataclasses.replace(TINY, freeze_bn=True, pretrained=""))


def _gt(manifest):
    return lambda image_id, shape: manifest.layout.read_label(image_id, shape=shape)


def test_a_label_of_the_wrong_size_names_its_png(tiny_manifest, tmp_path):
    """The dataset hands each label source its image's size, so a source reading PNGs names the bad file;
    a source that ignores the size is still caught, by image id."""
    image_id = tiny_manifest.splits["train"][0]
    h, w = tiny_manifest.layout.read_image(image_id).shape[:2]
    small = tmp_path / f"{image_id}.png"
    write_label_png(small, np.zeros((h // 2, w), np.uint8), voc_palette())
    space = tiny_manifest.label_space
    from_png = SegmentationSet(tiny_manifest, [image_id], lambda i, shape: read_label_png(small, space, shape=shape),
                               TINY)
    with pytest.raises(BadInputError, match=rf"{small.name}: label map is {h // 2}x{w} \(HxW\) but its image is "
                                            rf"{h}x{w}"):
        from_png[0, 0]
    unchecked = SegmentationSet(tiny_manifest, [image_id], lambda i, shape: np.zeros((h // 2, w), np.uint8), TINY)
    with pytest.raises(ValueError, match=rf"label of image '{image_id}' is \({h // 2}, {w}\)"):
        unchecked[0, 0]
    _, label = SegmentationSet(tiny_manifest, [image_id], _gt(tiny_manifest), TINY)[0, 0]
    assert label.shape == (TINY.crop_size, TINY.crop_size)


def test_trains_logs_and_resumes_exactly_after_a_kill(tiny_manifest, tmp_path, one_thread):
    straight = train_segmentation(TINY, tiny_manifest, _gt(tiny_manifest), tmp_path / "a", torch.device("cpu"))
    assert straight["iterations"] == 6 and np.isfinite(straight["final_loss"])
    rows = (tmp_path / "a" / "log.csv").read_text().splitlines()
    assert rows[0] == "epoch,iteration,loss,lr,val_miou,train_miou,seconds" and len(rows) == 1 + 6 // (24 // 4)
    assert 0 <= straight["train_miou"] <= 1 and rows[-1].split(",")[5] != ""

    resume = tmp_path / "resume"
    killed = train_segmentation(TINY, tiny_manifest, _gt(tiny_manifest), tmp_path / "b", torch.device("cpu"),
                                resume_dir=resume, stop_after=3)
    assert killed == {"stopped_at": 3} and (resume / "last.pt").is_file() and not (tmp_path / "b" / "model.pt").exists()
    resumed = train_segmentation(TINY, tiny_manifest, _gt(tiny_manifest), tmp_path / "b", torch.device("cpu"),
                                 resume_dir=resume)
    assert resumed["resumed_from"] == 2  # the last checkpoint before the kill (every 2 iterations)
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_predict_and_evaluate_with_and_without_crf(tiny_manifest, tmp_path, one_thread):
    cfg = dataclasses.replace(TINY, iterations=2, eval_every=0)
    train_segmentation(cfg, tiny_manifest, _gt(tiny_manifest), tmp_path, torch.device("cpu"))
    model = load_segmenter(cfg, tiny_manifest.label_space.num_classes, tmp_path, torch.device("cpu"))
    rgb = tiny_manifest.layout.read_image(tiny_manifest.splits["val"][0])
    probs = predict_probs(model, rgb, torch.device("cpu"), scales=(0.75, 1.0), flip=True)
    assert probs.shape == (tiny_manifest.label_space.num_classes, *rgb.shape[:2])
    assert np.allclose(probs.sum(0), 1, atol=1e-4)
    ids = tiny_manifest.splits["val"][:3]
    out = predict_images(EvalSegmentationConfig(scales=(1.0,), flip=False, crf=True), model, tiny_manifest, ids,
                         tmp_path / "pred", torch.device("cpu"))
    n = tiny_manifest.label_space.num_classes
    raw, crf = np.asarray(out["confusion_raw"]), np.asarray(out["confusion_crf"])
    assert raw.shape == crf.shape == (n, n) and raw.sum() == crf.sum() > 0
    assert all((tmp_path / "pred" / "labels" / f"{i}.png").is_file() for i in ids)
    assert all((tmp_path / "pred" / "raw" / f"{i}.png").is_file() for i in ids)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["deeplabv2", "deeplabv3plus"])
def test_forward_and_backward_on_cuda_match_cpu(name, cuda_device):
    torch.manual_seed(0)
    net = create_segmenter(name, "resnet_mini", 5, freeze_bn=True, msc=True).train()
    x, y = torch.randn(2, 3, 64, 80), torch.randint(0, 5, (2, 64, 80))
    y[:, :4] = 255
    results = []
    for device in (torch.device("cpu"), cuda_device):
        net.to(device).zero_grad(set_to_none=True)
        outputs = net(x.to(device))
        loss = segmentation_loss(outputs, y.to(device))
        loss.backward()
        results.append((outputs[-1].detach().cpu(), float(loss), net.base.backbone.conv1.weight.grad.cpu().clone()))
    (cpu_out, cpu_loss, cpu_grad), (gpu_out, gpu_loss, gpu_grad) = results
    torch.testing.assert_close(gpu_out, cpu_out, rtol=1e-3, atol=1e-4)
    assert gpu_loss == pytest.approx(cpu_loss, rel=1e-4)
    torch.testing.assert_close(gpu_grad, cpu_grad, rtol=1e-3, atol=1e-5)
    assert float(cpu_grad.abs().sum()) > 0


@pytest.mark.cuda
def test_amp_channels_last_step_on_cuda_follows_float32(cuda_device):
    """The bench's fast training step (bfloat16 autocast, channels-last) computes the float32 loss to bf16
    precision, and its gradients point the same way."""
    torch.manual_seed(0)
    net = create_segmenter("deeplabv2", "resnet_mini", 5, freeze_bn=True, msc=True).to(cuda_device).train()
    x, y = torch.randn(2, 3, 64, 80, device=cuda_device), torch.randint(0, 5, (2, 64, 80), device=cuda_device)
    losses, grads = [], []
    for fast in (False, True):
        fmt = torch.channels_last if fast else torch.contiguous_format
        net.to(memory_format=fmt).zero_grad(set_to_none=True)
        with torch.autocast(cuda_device.type, dtype=torch.bfloat16, enabled=fast):
            loss = segmentation_loss(net(x.to(memory_format=fmt)), y)
        loss.backward()
        losses.append(float(loss))
        grads.append(torch.cat([p.grad.flatten().float() for p in net.parameters() if p.grad is not None]))
    assert math.isfinite(losses[1]) and losses[1] == pytest.approx(losses[0], rel=0.05)
    assert float(torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)) > 0.95


def test_train_miou_scores_the_training_labels_it_is_given(tiny_manifest, one_thread):
    from stages.segmentation.model import build_model, evaluate_model, predict_probs
    torch.manual_seed(0)
    model = build_model(TINY, tiny_manifest.label_space.num_classes, pretrained=False).eval()
    ids = tiny_manifest.splits["train"][:4]
    own = {i: predict_probs(model, tiny_manifest.layout.read_image(i), torch.device("cpu")).argmax(0) for i in ids}
    cpu = torch.device("cpu")
    assert evaluate_model(model, tiny_manifest, ids, cpu, labels=lambda i, shape: own[i]) == pytest.approx(1.0)
    assert evaluate_model(model, tiny_manifest, ids, cpu) < 0.9      # against GT, a random net scores low


def test_agreed_labels_ignore_what_the_crf_changed():
    refined = np.array([[0, 1, 1], [2, 2, 255]], np.uint8)
    propagated = np.array([[0, 1, 2], [2, 0, 255]], np.uint8)
    assert agreed_labels(refined, propagated).tolist() == [[0, 1, 255], [2, 255, 255]]
    with pytest.raises(ValueError, match="differ in size"):
        agreed_labels(refined, propagated[:, :2])


def test_deeplab_on_agreed_labels_reads_both_label_stages(luigi_config):
    from pipeline.tasks import RefineCRF, TrainSegmentation
    keys = {}
    both = {"RefineCRF", "Propagate"}
    for source, reads in (("crf", {"RefineCRF"}), ("propagated", {"Propagate"}), ("agreed", both)):
        luigi_config("TrainSegmentation", "pseudo_labels", source)
        task = TrainSegmentation()
        assert {t.get_task_family() for t in task.upstream().values()} & {"RefineCRF", "Propagate"} == reads
        keys[source] = task.key
    assert len(set(keys.values())) == 3
    assert isinstance(task.upstream()["pseudo_labels"], RefineCRF)

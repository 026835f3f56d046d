"""GMNet's model: conditioning taps on the ASPP branches, the part losses, the twins toy, aligned augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.labelspace import LabelSpace
from data.parts import PartSpace
from data.synthetic import part_space
from models.deeplab import ConcatASPP
from models.gmnet import ConditioningNet
from models.segmenters import create_segmenter
from stages.config import TrainPartSegmentationConfig
from stages.parts.train import augment_parts, gt_object_maps, object_logits, param_groups, part_losses


def test_reference_widths_give_a_3200_channel_concat_at_the_aspp_grid(one_thread):
    cond = ConditioningNet(21, 1.0)
    taps = cond(torch.rand(1, 21, 65, 65))
    assert [t.shape[1] for t in taps] == [1024, 512, 256, 128]
    assert taps[0].shape[-2:] == (5, 5)  # conv5 at stride 16 of 65: already the ASPP grid
    aspp = ConcatASPP(32, 256, extra=cond.tap_channels).eval()
    assert aspp.fuse[0].in_channels == 3200
    grid = torch.nn.functional.interpolate
    out = aspp(torch.randn(1, 32, 5, 5), [grid(t, size=(5, 5), mode="bilinear") for t in taps])
    assert out.shape == (1, 256, 5, 5)


def test_gmnet_shapes_odd_sizes_and_gradients_reach_the_conditioning_net(one_thread):
    net = create_segmenter("gmnet", "resnet_mini", 28, num_objects=11, freeze_bn=False)
    assert net.conditioning.tap_channels == (256, 128, 64, 32)  # 1/4 width for the 64-wide head
    x, maps = torch.randn(2, 3, 53, 67), torch.rand(2, 11, 53, 67)
    logits = net(x, maps)
    assert logits.shape == (2, 28, 14, 17)
    logits.square().mean().backward()
    assert net.conditioning.conv1[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="object maps"):
        net(x)
    with pytest.raises(ValueError, match="num_objects"):
        create_segmenter("gmnet", "resnet_mini", 28)
    heads = {id(p) for g in net.param_groups() if g["lr_mult"] > 1 for p in g["params"]}
    assert all(id(p) in heads for p in net.conditioning.parameters())  # a new layer: the head's LR group


def test_cond_stride_pools_the_object_maps_and_keeps_the_output(one_thread):
    torch.manual_seed(0)
    pooled = create_segmenter("gmnet", "resnet_mini", 28, num_objects=11, freeze_bn=False, cond_stride=2).eval()
    full = create_segmenter("gmnet", "resnet_mini", 28, num_objects=11, freeze_bn=False).eval()
    full.load_state_dict(pooled.state_dict())
    x, maps = torch.randn(2, 3, 53, 67), torch.rand(2, 11, 53, 67)
    seen = []
    pooled.conditioning.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        out = pooled(x, maps)
        assert out.shape == full(x, maps).shape == (2, 28, 14, 17)
        assert not torch.allclose(out, full(x, maps))
    expected = torch.nn.functional.avg_pool2d(maps, 2, ceil_mode=True, count_include_pad=False)
    assert seen[0].shape == (2, 11, 27, 34) and torch.allclose(seen[0], expected)
    with pytest.raises(ValueError, match="cond_stride"):
        create_segmenter("gmnet", "resnet_mini", 28, num_objects=11, cond_stride=0)


def test_param_groups_take_gmnets_multipliers():
    net = create_segmenter("gmnet", "resnet_mini", 5, num_objects=3, freeze_bn=False)
    cfg = TrainPartSegmentationConfig(head_lr_mult=1.0, bias_lr_mult=2.0, freeze_bn=False)
    assert sorted(g["lr_mult"] for g in param_groups(net, cfg)) == [1.0, 1.0, 2.0]


def test_aux_head_sums_part_logits_per_object():
    logits = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3, 1)
    owner = torch.tensor([0, 1, 1, 2, 2])
    z = object_logits(logits, owner, 3)
    assert torch.equal(z[:, 1], logits[:, 1] + logits[:, 2]) and torch.equal(z[:, 0], logits[:, 0])


def test_augmentation_keeps_image_part_labels_and_object_maps_aligned(tiny_dataset):
    from data.parts import PartLayout
    from data.transforms import IMAGENET_MEAN, IMAGENET_STD
    layout = PartLayout(tiny_dataset, part_space())
    image_id = (tiny_dataset / "ImageSets/Segmentation/train.txt").read_text().split()[0]
    parts, objects = layout.read(image_id)
    rgb = np.zeros((*parts.shape, 3), np.uint8)
    rgb[..., 0] = np.where(parts == 255, 200, parts * 5)  # the image shows its own part map in the red channel
    maps = gt_object_maps(objects, 11)
    cfg = TrainPartSegmentationConfig(crop_size=48, scales=(0.75, 1.0, 1.25), freeze_bn=False)
    lookup = part_space().lookup()
    flips = 0
    for seed in range(8):
        x, p, o, m = augment_parts(rgb, parts, objects, maps, cfg, np.random.default_rng(seed))
        assert x.shape == (3, 48, 48) and p.shape == o.shape == (48, 48) and m.shape == (11, 48, 48)
        red = (x[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255
        # interior pixels (a 3x3 window of one part label): the image shows that label
        same = np.ones_like(p, bool)
        for dy, dx in ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)):
            same[1:-1, 1:-1] &= p[1 + dy:47 + dy, 1 + dx:47 + dx] == p[1:-1, 1:-1]
        same[[0, -1]], same[:, [0, -1]] = False, False
        inner = same & (p != 255)
        assert inner.sum() > 100
        np.testing.assert_allclose(red[inner], p[inner] * 5.0, atol=0.5)
        valid = (p != 255) & (o != 255)
        assert np.array_equal(lookup[p][valid], o[valid])
        assert np.array_equal(m.argmax(0)[inner], o[inner])
        flips += bool(np.random.default_rng(seed).random(4)[-1] < 0.5)
    assert flips  # some of the draws flip


# ------------------------------------------------------------------------------- the twins toy

TWINS = PartSpace(LabelSpace(("background", "a.top", "a.bottom", "b.top", "b.bottom")),
                  LabelSpace(("background", "a", "b")), (0, 1, 1, 2, 2))


def twins_batch(rng: np.random.Generator, n: int, size: int = 32) -> tuple[torch.Tensor, ...]:
    """Objects a and b drawn identically (a bright textured square), with disjoint part labels."""
    images = rng.normal(0, 0.3, (n, 3, size, size)).astype(np.float32)
    parts = np.zeros((n, size, size), np.int64)
    objects = np.zeros((n, size, size), np.int64)
    for i in range(n):
        obj = int(rng.integers(1, 3))
        s = int(rng.integers(12, 18))
        y, x = (int(v) for v in rng.integers(0, size - s, 2))
        images[i, :, y:y + s, x:x + s] = 1.5 + 0.3 * np.sign(np.sin(np.arange(s)))[None, None, :]
        objects[i, y:y + s, x:x + s] = obj
        parts[i, y:y + s // 2, x:x + s] = 2 * obj - 1
        parts[i, y + s // 2:y + s, x:x + s] = 2 * obj
    maps = np.stack([gt_object_maps(o, 3) for o in objects])
    return tuple(torch.from_numpy(a) for a in (images, parts, objects, maps))


def train_twins(conditioned: bool) -> tuple[float, float]:
    """Mean IoU of the four twin parts on held-out images after a few seconds of training, and the share of
    object pixels predicted as a part whose part belongs to the right object."""
    torch.manual_seed(0)
    name = "gmnet" if conditioned else "deeplabv3plus"
    extra = {"num_objects": 3} if conditioned else {}
    net = create_segmenter(name, "resnet_mini", 5, freeze_bn=False, **extra)
    cfg = TrainPartSegmentationConfig(gm_mode="off", aux_lambda=0.0, freeze_bn=False)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    owner = torch.tensor(TWINS.object_of_part)
    rng = np.random.default_rng(0)
    net.train()
    for _ in range(80):
        x, p, o, m = twins_batch(rng, 8)
        loss, _ = part_losses(net(x, m) if conditioned else net(x), p, o, owner, 3, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    x, p, o, m = twins_batch(np.random.default_rng(1), 32)
    with torch.no_grad():
        logits = net(x, m) if conditioned else net(x)
        pred = torch.nn.functional.interpolate(logits, size=p.shape[-2:], mode="bilinear",
                                               align_corners=True).argmax(1)
    ious = [((pred == k) & (p == k)).sum().item() / max(1, ((pred == k) | (p == k)).sum().item())
            for k in range(1, 5)]
    right_object = (owner[pred] == o)[(o > 0) & (pred > 0)].float().mean().item()
    return float(np.mean(ious)), right_object


def test_twins_conditioning_on_objects_separates_parts_that_look_the_same(one_thread):
    (plain_iou, plain_object), (cond_iou, cond_object) = train_twins(False), train_twins(True)
    assert plain_iou <= 0.6 and plain_object <= 0.75, (plain_iou, plain_object)  # measured 0.26, 0.57
    assert cond_iou >= 0.75 and cond_object >= 0.95, (cond_iou, cond_object)    # measured 0.85, 1.0


def test_part_losses_terms():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 8, 8, requires_grad=True)
    _, p, o, _ = twins_batch(np.random.default_rng(2), 2)
    owner = torch.tensor(TWINS.object_of_part)
    cfg = TrainPartSegmentationConfig(gm_mode="st", gm_lambda=0.1, aux_lambda=1e-4, freeze_bn=False)
    total, terms = part_losses(logits, p, o, owner, 3, cfg)
    assert set(terms) == {"ce", "aux", "gm"}
    assert total.item() == pytest.approx(terms["ce"] + 1e-4 * terms["aux"] + 0.1 * terms["gm"], rel=1e-5)
    total.backward()
    assert logits.grad is not None


@pytest.mark.cuda
def test_gmnet_training_step_on_cuda_matches_cpu(cuda_device):
    """The conditioned model's logits, its three loss terms (GM in st mode) and every gradient, CPU against CUDA
    (the fixture turns TF32 off: the comparison is of the code, not of the GPU's reduced-precision convolutions)."""
    cpu, gpu = _gmnet_step(torch.device("cpu")), _gmnet_step(cuda_device)
    (cpu_logits, cpu_terms, cpu_grads), (gpu_logits, gpu_terms, gpu_grads) = cpu, gpu
    torch.testing.assert_close(gpu_logits, cpu_logits, rtol=1e-4, atol=1e-4)
    assert set(cpu_terms) == {"ce", "aux", "gm"} and cpu_terms["gm"] > 0
    assert all(gpu_terms[k] == pytest.approx(cpu_terms[k], rel=1e-4) for k in cpu_terms)
    assert gpu_grads.keys() == cpu_grads.keys() and cpu_grads["conditioning.conv1.0.weight"].abs().sum() > 0
    for name, grad in cpu_grads.items():
        error = (gpu_grads[name] - grad).norm() / grad.norm().clamp_min(1e-12)
        assert error < 1e-3, (name, error.item())


def _gmnet_step(device: torch.device) -> tuple[torch.Tensor, dict[str, float], dict[str, torch.Tensor]]:
    """One GMNet forward and backward (CE + aux + st GM) from fixed seeds on ``device``."""
    space = part_space()
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, space.num_parts, (2, 6, 8))
    parts = torch.from_numpy(coarse.repeat(8, 1).repeat(8, 2).astype(np.int64))
    owner = torch.tensor(space.object_of_part)
    objects = owner[parts]
    parts[torch.from_numpy(rng.random(parts.shape) < 0.1)] = 255
    torch.manual_seed(0)
    images = torch.randn(2, 3, 48, 64)
    maps = torch.randn(2, space.num_objects, 48, 64).softmax(1)
    net = create_segmenter("gmnet", "resnet_mini", space.num_parts, num_objects=space.num_objects,
                           freeze_bn=False).eval()  # eval: no dropout draw to differ between the devices
    cfg = TrainPartSegmentationConfig(gm_mode="st", gm_lambda=1.0, aux_lambda=0.1, freeze_bn=False)
    model = net.to(device)
    logits = model(images.to(device), maps.to(device))
    total, terms = part_losses(logits, parts.to(device), objects.to(device), owner.to(device), space.num_objects, cfg)
    total.backward()
    grads = {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach().cpu(), terms, grads

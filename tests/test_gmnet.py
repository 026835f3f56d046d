"""GMNet's graph-matching loss against a pixel loop of the reference rules, its modes and its no-op finding."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from torch import nn

from stages.parts.graph_matching import graph_matching_loss, graph_matching_maps


def loop_reference(pred: np.ndarray, labels: np.ndarray, num_classes: int, valid: str = "same") -> float:
    """The released rules written out pixel by pixel and pair by pair (no Gram matrix, no pooling ops)."""
    pred = pred.copy()
    if valid == "same":
        pred[labels == 255] = 255
    classes = sorted({int(v) if v != 255 else 0 for y in (pred, labels) for v in np.unique(y)})[1:]
    b, h, w = labels.shape

    def dilated(y: np.ndarray, k: int) -> np.ndarray:
        out = np.zeros((b, h, w), bool)
        for n, i, j in itertools.product(range(b), range(h), range(w)):
            out[n, i, j] = any(y[n, i + di, j + dj] == k for di in (0, 1) for dj in (0, 1)
                               if i + di < h and j + dj < w)
        return out

    def graph(y: np.ndarray) -> np.ndarray:
        masks = {k: dilated(y, k) for k in classes}
        adj = np.zeros((num_classes, num_classes))
        for i, k in enumerate(classes):
            for m in classes[i + 1:]:
                adj[k, m] = np.count_nonzero(masks[k] & masks[m])
        norm = np.sqrt(np.maximum((adj ** 2).sum(0), 1e-12))
        return adj / norm

    return float(((graph(pred) - graph(labels)) ** 2).sum() / num_classes)


def random_maps(seed: int, b: int = 2, h: int = 9, w: int = 11, c: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Blocky label maps (so that classes touch) with 255 holes, and a noisy prediction of them."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, c, (b, (h + 2) // 3, (w + 2) // 3))
    labels = coarse.repeat(3, 1).repeat(3, 2)[:, :h, :w].astype(np.int64)
    labels[rng.random(labels.shape) < 0.15] = 255
    pred = np.where(rng.random(labels.shape) < 0.3, rng.integers(0, c, labels.shape), labels)
    pred = np.where(pred == 255, rng.integers(0, c, labels.shape), pred)
    return pred, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("valid", ["same", "pred_all"])
def test_hard_equals_a_loop_over_pixels_and_pairs(seed, valid):
    pred, labels = random_maps(seed)
    ours = graph_matching_maps(torch.from_numpy(pred), torch.from_numpy(labels), 6, valid=valid,
                               dtype=torch.float64)
    assert ours.item() == pytest.approx(loop_reference(pred, labels, 6, valid), abs=1e-12)
    assert ours.item() > 0


def test_the_smallest_present_class_is_skipped_not_class_zero():
    # no background and no hole: class 1 is the smallest present id, so how much it touches 3 is not counted
    labels = torch.tensor([[[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 3, 3]]])
    pred = torch.tensor([[[1, 1, 2, 2], [1, 1, 1, 2], [3, 3, 3, 3]]])
    assert graph_matching_maps(pred, labels, 4).item() == 0.0
    # a 255 hole is read as class 0, which then is the one skipped: the 1-3 contact now counts
    holed = labels.clone()
    holed[0, 2, 3] = 255
    value = graph_matching_maps(pred, holed, 4, dtype=torch.float64).item()
    assert value > 0.0
    assert value == pytest.approx(loop_reference(pred.numpy(), holed.numpy(), 4), abs=1e-12)


def test_a_hand_made_two_part_graph():
    # parts 1 and 2 side by side, background 0 around them: A[1, 2] counts the pixels both dilated masks cover
    from stages.parts.graph_matching import adjacency, dilate, map_gram, present_classes, restrict
    labels = torch.tensor([[[0, 0, 0, 0], [0, 1, 2, 0], [0, 1, 2, 0], [0, 0, 0, 0]]])
    present = present_classes(labels, labels, 3)
    assert present.tolist() == [False, True, True]
    adj = restrict(map_gram(labels, 3, 2), present)
    # the scatter of the label map's windows gives the max filter of its one-hot masks
    masks = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).double()
    assert torch.equal(adj, adjacency(dilate(masks, 2), present))
    # part 1 dilated covers columns 0-1 of rows 0-2, part 2 columns 1-2 of rows 0-2: both on column 1, rows 0-2
    expected = torch.zeros(3, 3, dtype=torch.float64)
    expected[1, 2] = 3
    assert torch.equal(adj, expected)


@pytest.mark.parametrize("size", [1, 2, 3])
def test_label_masks_are_the_max_filter_of_the_one_hot_masks(size):
    from stages.parts.graph_matching import dilate, dilated_label_masks
    _, labels = random_maps(4, c=7)
    y = torch.from_numpy(labels)
    hot = torch.nn.functional.one_hot(torch.where(y == 255, 7, y), 8)[..., :7].permute(0, 3, 1, 2).float()
    expected = dilate(hot, size).permute(0, 2, 3, 1).reshape(-1, 7)
    assert torch.equal(dilated_label_masks(y, 7, size, torch.float32), expected)


def test_gm_at_the_logits_resolution_reads_the_labels_on_the_logits_grid():
    from stages.config import TrainPartSegmentationConfig
    from stages.parts.train import part_losses, sample_labels
    labels = torch.arange(29)[None, :, None].expand(1, 29, 29) % 5
    logits = torch.randn(1, 5, 8, 8)
    sampled = sample_labels(labels, logits)
    assert sampled.shape == (1, 8, 8)
    assert sampled[0, :, 0].tolist() == [(4 * i) % 5 for i in range(8)]   # rows 0, 4, ..., 28: corners aligned
    _, pred = random_maps(5, b=2, h=29, w=29, c=5)
    parts = torch.from_numpy(pred)
    owner = torch.zeros(5, dtype=torch.long)
    cfg = TrainPartSegmentationConfig(gm_mode="hard", aux_lambda=0.0, freeze_bn=False)
    at_logits = part_losses(logits.expand(2, -1, -1, -1), parts, parts * 0, owner, 1,
                            dataclasses.replace(cfg, gm_resolution="logits"))[1]["gm"]
    at_labels = part_losses(logits.expand(2, -1, -1, -1), parts, parts * 0, owner, 1, cfg)[1]["gm"]
    expected = graph_matching_loss(logits.expand(2, -1, -1, -1), sample_labels(parts, logits), "hard").item()
    assert at_logits == pytest.approx(expected)
    assert at_logits != pytest.approx(at_labels)


def test_modes_value_and_gradient():
    pred, labels = random_maps(3)
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 9, 11, requires_grad=True)
    y = torch.from_numpy(labels)
    hard = graph_matching_loss(logits, y, "hard")
    st = graph_matching_loss(logits, y, "st")
    assert not hard.requires_grad
    assert st.item() == pytest.approx(hard.item(), abs=1e-6)
    (grad,) = torch.autograd.grad(st, logits)
    assert grad.abs().sum() > 0
    assert graph_matching_loss(logits, y, "off").item() == 0.0
    one_hot_logits = torch.nn.functional.one_hot(torch.from_numpy(pred), 6).permute(0, 3, 1, 2).float() * 1e3
    soft = graph_matching_loss(one_hot_logits, y, "soft")
    assert soft.item() == pytest.approx(graph_matching_loss(one_hot_logits, y, "hard").item(), abs=1e-6)
    with pytest.raises(ValueError, match="gm_mode"):
        graph_matching_loss(logits, y, "exact")


@pytest.mark.parametrize("mode", ["hard", "soft", "st"])
def test_invariant_to_the_order_of_images(mode):
    _, labels = random_maps(4, b=3)
    torch.manual_seed(1)
    logits = torch.randn(3, 6, 9, 11)
    y = torch.from_numpy(labels)
    order = torch.tensor([2, 0, 1])
    a = graph_matching_loss(logits, y, mode)
    b = graph_matching_loss(logits[order], y[order], mode)
    assert a.item() == pytest.approx(b.item(), abs=1e-6)


def test_descending_the_soft_gradient_lowers_the_released_loss():
    pred, labels = random_maps(5, b=2, h=12, w=12)
    y = torch.from_numpy(labels)
    logits = (torch.nn.functional.one_hot(torch.from_numpy(pred), 6).permute(0, 3, 1, 2).float() * 2)
    logits.requires_grad_(True)
    start = graph_matching_loss(logits, y, "hard").item()
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(60):
        opt.zero_grad()
        graph_matching_loss(logits, y, "st").backward()
        opt.step()
    assert graph_matching_loss(logits, y, "hard").item() < 0.7 * start


def _train_tiny(gm_mode: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(2, 3, 10, 10, generator=gen)
        y = torch.randint(0, 5, (2, 10, 10), generator=gen)
        y[:, :2] = 255
        logits = net(x)
        loss = nn.functional.cross_entropy(logits, y, ignore_index=255)
        loss = loss + 0.1 * graph_matching_loss(logits, y, gm_mode)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_training_with_the_released_loss_gives_the_weights_of_training_without_it():
    off, hard, st = _train_tiny("off"), _train_tiny("hard"), _train_tiny("st")
    assert all(torch.equal(off[k], hard[k]) for k in off)
    assert not all(torch.equal(off[k], st[k]) for k in off)  # the straight-through gradient does move them


def test_straight_through_takes_the_soft_gradient_even_where_the_prediction_misses_an_adjacency():
    """Parts 1 and 2 touch in the GT; the prediction calls both 1, so its column of part 2 is empty. A
    straight-through on the masks would scale that column's gradient by the normaliser's 1e6 floor."""
    labels = torch.zeros(1, 16, 16, dtype=torch.long)
    labels[0, 2:8, 2:6], labels[0, 2:8, 6:10], labels[0, 10:14, 10:14] = 1, 2, 3
    logits = torch.zeros(1, 4, 16, 16)
    logits[0, 0] += 2
    logits[0, 1, 2:8, 2:10] += 6
    logits[0, 3, 10:14, 10:14] += 6
    logits.requires_grad_(True)
    st = graph_matching_loss(logits, labels, "st")
    assert st.item() == pytest.approx(graph_matching_loss(logits, labels, "hard").item(), abs=1e-6)
    assert st.item() > 0.2   # the missed adjacency costs
    (grad_st,) = torch.autograd.grad(st, logits)
    (grad_soft,) = torch.autograd.grad(graph_matching_loss(logits, labels, "soft"), logits)
    torch.testing.assert_close(grad_st, grad_soft)
    assert grad_st.abs().max() < 1.0


def test_the_column_normalisation_keeps_hard_values_and_bounds_the_soft_gradient():
    """A soft Gram's column of a part the prediction nearly misses holds a few thousandths of a pixel: over a
    1e-12 floor, 1 / norm would multiply its gradient by ~500 here (without bound as it shrinks)."""
    from stages.parts.graph_matching import normalise_columns
    adj = torch.zeros(3, 3, dtype=torch.float64)
    adj[0, 2], adj[1, 2] = 1e-3, 2e-3
    adj.requires_grad_(True)
    (grad,) = torch.autograd.grad(normalise_columns(adj)[0, 2], adj)
    assert grad.abs().max() <= 1.0
    pred, y = random_maps(8)          # on pixel counts the floor of 1 changes nothing: the released value
    assert graph_matching_maps(torch.from_numpy(pred), torch.from_numpy(y), 6, dtype=torch.float64).item() == \
        pytest.approx(loop_reference(pred, y, 6), abs=1e-12)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["hard", "soft", "st"])
def test_gm_loss_on_cuda_matches_cpu(mode, cuda_device):
    _, labels = random_maps(7, b=3, h=33, w=41)
    torch.manual_seed(2)
    logits, y = torch.randn(3, 6, 33, 41), torch.from_numpy(labels)
    values, grads = [], []
    for device in (torch.device("cpu"), cuda_device):
        x = logits.to(device).requires_grad_(mode != "hard")
        loss = graph_matching_loss(x, y.to(device), mode)
        values.append(loss.item())
        if mode != "hard":
            grads.append(torch.autograd.grad(loss, x)[0].cpu())
    assert values[0] > 0 and values[1] == pytest.approx(values[0], rel=1e-5)
    if grads:
        assert grads[0].abs().sum() > 0
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)

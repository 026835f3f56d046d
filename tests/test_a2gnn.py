"""A2GNN (stages/propagation/a2gnn.py, models/a2gnn.py): window maths against dense references, losses, the per-image
propagation on planted layouts, and the a2gnn affinity net through train_affinity."""

from __future__ import annotations

import dataclasses
import math
import zlib

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import stages.propagation.a2gnn
import stages.propagation.propagate
from bench.a2gnn import dense_attention
from data.artifacts import label_file
from data.dense import DenseMapReader, DenseMapWriter
from data.io import read_label_png, write_label_png
from data.manifest import Manifest
from models.a2gnn import (
    A2GNN,
    A2GNNAffinityNet,
    A2GNNBatch,
    WindowGraph,
    rgbxy_kernel,
    window_attention,
    window_distance,
    window_dot,
    window_mix,
    window_offsets,
    window_valid,
)
from models.resnet import create_backbone
from stages.affinity.a2gnn import affinity_loss, gated_penalty, window_pair_masks
from stages.affinity.train import (
    affinity_net_inputs,
    infer_affinity_input,
    load_affinity_model,
    pair_losses,
    train_affinity,
)
from stages.config import PropagateConfig, TrainAffinityConfig
from stages.metrics import with_background
from stages.propagation import PROPAGATION_METHODS
from stages.propagation.a2gnn import (
    GridBox,
    LossPixels,
    bilinear_taps,
    gated_crf_loss,
    grid_boxes,
    multi_point_loss,
    propagate_a2gnn,
    propagate_a2gnn_many,
    resolve_schedule,
    sample_taps,
    seed_channels,
    seed_loss,
    window_random_walk,
)
from stages.propagation.propagate import propagate_images, validate_propagation

CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------- dense references


def dense_window_matrices(window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, M) N x N by walking every node and offset: A_ij = window[k, i] for j = i + offset k, A_ii = 1;
    M_ij = 1 inside i's window."""
    d, h, w = window.shape
    radius = math.isqrt(d) // 2
    n = h * w
    adjacency, mask = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
    for y in range(h):
        for x in range(w):
            for k, (dy, dx) in enumerate(window_offsets(radius)):
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    adjacency[y * w + x, (y + dy) * w + x + dx] = window[k, y, x]
                    mask[y * w + x, (y + dy) * w + x + dx] = 1
    adjacency.fill_diagonal_(1)
    return adjacency, mask


def test_window_attention_matches_dense_reference():
    gen = torch.Generator().manual_seed(0)
    h, w, radius, channels = 4, 5, 1, 6
    window = torch.rand((2 * radius + 1) ** 2, h, w, generator=gen, dtype=torch.float64)
    features = torch.randn(h * w, channels, generator=gen, dtype=torch.float64)   # signed: some cos < 0
    graph = WindowGraph.from_window_affinity(window)
    adjacency, mask = dense_window_matrices(window)
    got = window_attention(features, torch.tensor(0.7, dtype=torch.float64), graph)
    want = dense_attention(features, 0.7, adjacency, mask)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # Both masks were exercised: off-grid neighbours and negative cosines inside the window.
    norms = features.norm(dim=1, keepdim=True)
    cos = (features @ features.T) / (norms @ norms.T)
    assert bool(((cos < 0) & (mask == 1)).any()) and not bool(graph.valid.all())


def test_window_attention_gradients_match_dense_reference():
    gen = torch.Generator().manual_seed(1)
    window = torch.rand(25, 5, 6, generator=gen, dtype=torch.float64)
    graph = WindowGraph.from_window_affinity(window)
    adjacency, mask = dense_window_matrices(window)
    base = torch.rand(30, 8, generator=gen, dtype=torch.float64)
    grads = []
    for layer in (lambda x, b: window_attention(x, b, graph), lambda x, b: dense_attention(x, b, adjacency, mask)):
        features, beta = base.clone().requires_grad_(), torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        (layer(features, beta) ** 2).sum().backward()
        grads.append((features.grad, beta.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-9, atol=1e-12)


def test_window_mix_is_the_window_sparse_product():
    gen = torch.Generator().manual_seed(7)
    graph = WindowGraph.from_window_affinity(torch.rand(49, 4, 9, generator=gen, dtype=torch.float64))
    weights = torch.rand(36, 49, generator=gen, dtype=torch.float64)
    h = torch.randn(36, 5, generator=gen, dtype=torch.float64)
    want = ((weights * graph.valid)[..., None] * h[graph.index]).sum(1)
    torch.testing.assert_close(window_mix(weights, h, 4, 9, 3), want)
    dots = (h[:, None, :] * h[graph.index]).sum(-1) * graph.valid
    torch.testing.assert_close(window_dot(h, 4, 9, 3), dots)


def test_window_distance_matches_brute_force_loop():
    gen = torch.Generator().manual_seed(2)
    features = torch.randn(1, 3, 4, 5, generator=gen, dtype=torch.float64)
    radius = 2
    got = window_distance(features, radius)
    padded = F.pad(features, (radius,) * 4)   # unfold's zero padding
    for k, (dy, dx) in enumerate(window_offsets(radius)):
        for y in range(4):
            for x in range(5):
                other = padded[0, :, y + dy + radius, x + dx + radius]
                want = (features[0, :, y, x] - other).abs().mean()
                assert abs(float(got[0, k, y, x] - want)) < 1e-12
    valid = window_valid(4, 5, radius)
    assert valid.shape == (25, 4, 5) and bool(valid[12].all()) and not bool(valid[0, 0, 0])


def test_window_random_walk_equals_dense_transition_power():
    gen = torch.Generator().manual_seed(3)
    window = torch.rand(9, 3, 4, generator=gen, dtype=torch.float64)   # deliberately not symmetric
    graph = WindowGraph.from_window_affinity(window)
    adjacency, _ = dense_window_matrices(window)
    powered = adjacency ** 8
    transition = powered / powered.sum(0, keepdim=True)
    vectors = torch.rand(3, 12, generator=gen, dtype=torch.float64)
    want = vectors @ torch.linalg.matrix_power(transition, 16)
    torch.testing.assert_close(window_random_walk(vectors, graph, 8.0, 16), want, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------- affinity-net loss


def test_window_pair_masks_on_a_hand_built_map():
    labels = torch.tensor([[[0, 0, 1],
                            [0, 255, 1],
                            [2, 2, 1]]])
    masks = window_pair_masks(labels, 1)
    centre = 4                                    # offset (0, 0)
    right, down = 5, 7                            # offsets (0, 1) and (1, 0)
    assert masks["bg"][0, centre, 0, 0] == 1 and masks["bg"][0, right, 0, 0] == 1     # 0 -> 0
    assert masks["neg"][0, right, 0, 1] == 1                                           # 0 -> 1
    assert masks["fg"][0, down, 0, 2] == 1                                             # 1 -> 1
    assert masks["neg"][0, right, 2, 1] == 1                                           # 2 -> 1
    assert all(float(m[0, :, 1, 1].sum()) == 0 for m in masks.values())               # ignored centre
    # Counts against a walk over every node and in-grid neighbour.
    grid = labels[0].numpy()
    counts = {"bg": 0, "fg": 0, "neg": 0}
    for y in range(3):
        for x in range(3):
            for dy, dx in window_offsets(1):
                if not (0 <= y + dy < 3 and 0 <= x + dx < 3):
                    continue
                a, b = grid[y, x], grid[y + dy, x + dx]
                if 255 in (a, b):
                    continue
                counts["neg" if a != b else ("bg" if a == 0 else "fg")] += 1
    assert {k: int(v.sum()) for k, v in masks.items()} == counts


def _tiny_affinity_net(radius: int = 1) -> A2GNNAffinityNet:
    torch.manual_seed(0)
    return A2GNNAffinityNet(create_backbone("resnet_mini"), window_radius=radius)


def test_affinity_loss_combines_pair_terms_and_gated_penalty(monkeypatch):
    model = _tiny_affinity_net(radius=1)
    labels = torch.tensor([[[0, 0, 1], [0, 255, 1], [2, 2, 1]]])
    gen = torch.Generator().manual_seed(4)
    distance = torch.rand(1, 9, 3, 3, generator=gen)
    monkeypatch.setattr(model, "window_outputs",
                        lambda images: {"distance": distance, "affinity": torch.exp(-distance)})
    images = torch.randn(1, 3, 24, 24, generator=gen)
    loss, parts, masks = affinity_loss(model, images, labels)
    terms = pair_losses(torch.exp(-distance), window_pair_masks(labels, 1))
    gated = gated_penalty(distance, images, 8, 1, 0.1, 6.0)
    expected = terms["bg"] / 4 + terms["fg"] / 4 + terms["neg"] / 2 + 3 * gated
    assert float(gated) > 0
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(parts["gated"], gated)
    assert set(masks) == {"bg", "fg", "neg"}


def test_gated_penalty_is_zero_for_identical_features_and_skips_padding():
    gen = torch.Generator().manual_seed(5)
    images = torch.randn(2, 3, 32, 40, generator=gen)
    same = window_distance(torch.ones(2, 7, 4, 5), 2) * window_valid(4, 5, 2)[None]
    assert float(gated_penalty(same, images, 8, 2)) == 0.0
    varied = window_distance(torch.randn(2, 7, 4, 5, generator=gen), 2)
    assert float(gated_penalty(varied, images, 8, 2)) > 0
    # An all-padding image (zeros) has no pixel inside: nothing is penalised.
    assert float(gated_penalty(varied, torch.zeros(2, 3, 32, 40), 8, 2)) == 0.0


def test_gated_crf_loss_matches_pairwise_sum():
    gen = torch.Generator().manual_seed(6)
    rgb = torch.randn(1, 3, 3, 4, generator=gen, dtype=torch.float64)
    probs = torch.softmax(torch.randn(3, 3, 4, generator=gen, dtype=torch.float64), 0)
    radius, sigma_rgb, sigma_xy = 2, 0.5, 1.5
    kernel = rgbxy_kernel(rgb, radius, sigma_rgb, sigma_xy)[0]
    total = 0.0
    for y in range(3):
        for x in range(4):
            for y2 in range(3):
                for x2 in range(4):
                    if (y, x) == (y2, x2) or abs(y - y2) > radius or abs(x - x2) > radius:
                        continue
                    colour = float((((rgb[0, :, y, x] - rgb[0, :, y2, x2]) / sigma_rgb) ** 2).sum())
                    k = math.exp(-0.5 * colour - 0.5 * ((y - y2) ** 2 + (x - x2) ** 2) / sigma_xy ** 2)
                    total += k * (1 - float((probs[:, y, x] * probs[:, y2, x2]).sum()))
    assert abs(float(gated_crf_loss(probs, kernel, radius)) - total / 12) < 1e-10


# -------------------------------------------------------------------------------------------- box losses


def test_multi_point_loss_picks_row_and_column_maxima_and_drops_inconsistent_nodes():
    h, w, classes = 3, 4, 3
    logits = torch.zeros(h * w, classes)
    class_one = torch.tensor([[9., 0., 1., 2.],
                              [9., 5., 3., 1.],
                              [9., 2., 4., 0.]])
    logits[:, 1] = class_one.reshape(-1)
    logits[:, 0] = torch.linspace(-1, 1, h * w)
    box = GridBox(channel=1, y0=0, y1=2, x0=1, x1=3)        # column 0 (the 9s) lies outside the box
    rows = [0 * w + 3, 1 * w + 1, 2 * w + 2]                # per row, the max of columns 1..3
    cols = [1 * w + 1, 2 * w + 2, 0 * w + 3]                # per column, the max of rows 0..2
    embedding = torch.ones(h * w, 4)
    embedding[1 * w + 3] = -1                               # node (1, 3): not a point, opposite direction
    labels = torch.full((h * w,), 255, dtype=torch.long)
    labels[[1 * w + 3, 2 * w + 1]] = 1                      # (1, 3) should go, (2, 1) stays
    labels[0 * w + 1] = 2                                   # another class: untouched
    labels[0] = 1                                           # outside the box: untouched
    pixels = LossPixels.labelled(labels.view(h, w), (h, w), 1)
    loss, checked = multi_point_loss(logits, embedding, [box], pixels)
    expected = F.cross_entropy(logits[rows + cols], torch.ones(6, dtype=torch.long))
    torch.testing.assert_close(loss, expected)              # identical point embeddings: no spread term
    after = dict(zip((pixels.ys * w + pixels.xs).tolist(), checked.tolist()))
    assert after == {1 * w + 3: 255, 2 * w + 1: 1, 0 * w + 1: 2, 0: 1}
    assert int(pixels.labels[(pixels.ys == 1) & (pixels.xs == 3)]) == 1   # the input is not modified


def test_loss_pixels_read_the_bilinearly_upsampled_grid():
    """The taps give F.interpolate's values (align_corners=False, x stride) at any pixel, borders included."""
    torch.manual_seed(0)
    grid, stride = (5, 7), 8
    values = torch.randn(grid[0] * grid[1], 3)
    full = F.interpolate(values.T.reshape(1, 3, *grid), (40, 56), mode="bilinear", align_corners=False)[0]
    ys = torch.tensor([0, 0, 3, 4, 17, 39, 39, 20])
    xs = torch.tensor([0, 55, 3, 4, 30, 0, 55, 11])
    index, weight = bilinear_taps(ys, xs, grid, stride)
    torch.testing.assert_close(sample_taps(values, index, weight), full[:, ys, xs].T)
    same, ones = bilinear_taps(ys[:3] % 5, xs[:3] % 7, grid, 1)        # stride 1: each pixel is its own node
    torch.testing.assert_close(sample_taps(values, same, ones), values[(ys[:3] % 5) * 7 + xs[:3] % 7])


def reference_box_losses(logits: torch.Tensor, embedding: torch.Tensor, labels: torch.Tensor, box: tuple,
                         grid: tuple[int, int], stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mytool.py's train_with_mp_nocrf, written out: logits and embedding upsampled to the padded label map,
    per-pixel row/column points, consistency check, then CE(bg seeds) + CE(fg seeds) on the checked labels."""
    size = (grid[0] * stride, grid[1] * stride)
    pred = F.interpolate(logits.T.reshape(1, -1, *grid), size, mode="bilinear", align_corners=False)[0]
    fts = F.interpolate(embedding.T.reshape(1, -1, *grid), size, mode="bilinear", align_corners=False)[0]
    channel, x0, y0, x1, y1 = box
    region = pred[:, y0:y1 + 1, x0:x1 + 1]
    rows = region[channel].argmax(1)                                    # per row, the best column
    cols = region[channel].argmax(0)
    picked = torch.cat([region[:, torch.arange(y1 - y0 + 1), rows], region[:, cols, torch.arange(x1 - x0 + 1)]], 1)
    fbox = fts[:, y0:y1 + 1, x0:x1 + 1]
    points = torch.cat([fbox[:, torch.arange(y1 - y0 + 1), rows], fbox[:, cols, torch.arange(x1 - x0 + 1)]], 1).T
    norms = points.norm(dim=1, keepdim=True)
    cos = (points @ points.T) / (norms @ norms.T + 1e-7)
    target = torch.full((picked.shape[1],), channel)
    mp = F.cross_entropy(picked.T, target, reduction="sum") / picked.shape[1] + (1 - cos).sum() / cos.numel()
    labels = labels.clone()
    similarity = F.cosine_similarity(fbox.detach(), points.detach().mean(0)[:, None, None], dim=0)
    inside = labels[y0:y1 + 1, x0:x1 + 1]
    inside[(similarity < 0) & (inside == channel)] = 255
    bg, fg = labels.clone(), labels.clone()
    bg[labels != 0] = 255
    fg[labels == 0] = 255
    seed = F.cross_entropy(pred[None], bg[None], ignore_index=255) + F.cross_entropy(pred[None], fg[None],
                                                                                         ignore_index=255)
    return mp + seed, labels


def test_image_resolution_losses_match_the_reference_formulation():
    """Seed, multi-point and consistency losses on the padded image (A2GNN): same value, gradients and checked
    labels as the reference's dense upsampling."""
    torch.manual_seed(3)
    grid, stride, classes = (4, 5), 8, 3
    logits = torch.randn(20, classes, requires_grad=True)
    embedding = torch.randn(20, 6, requires_grad=True)
    labels = torch.full((32, 40), 255, dtype=torch.long)
    labels[2:12, 3:30] = 0
    labels[14:30, 6:35] = 2
    labels[20:26, 20:24] = 1
    box = (2, 5, 13, 36, 31)                                            # channel, x0, y0, x1, y1 (pixels)
    want, want_labels = reference_box_losses(logits, embedding, labels, box, grid, stride)
    want_grads = torch.autograd.grad(want, (logits, embedding))
    pixels = LossPixels.labelled(labels, grid, stride)
    mp, checked = multi_point_loss(logits, embedding, [GridBox(2, 13, 31, 5, 36)], pixels)
    got = mp + seed_loss(pixels.sample(logits), checked)
    torch.testing.assert_close(got, want)
    for ours, theirs in zip(torch.autograd.grad(got, (logits, embedding)), want_grads):
        torch.testing.assert_close(ours, theirs)
    assert torch.equal(checked, want_labels[pixels.ys, pixels.xs])
    assert int((checked == 255).sum()) > 0                              # the check did drop something


def test_point_seeds_off_block_centres_reach_the_gnn():
    """Single-pixel seeds that miss every block centre: the image-resolution losses (A2GNN) train on them; the
    grid variant sees no seed and keeps the CAM label's scores."""
    inputs = planted_inputs()
    seeds = inputs["seeds"]
    ys, xs = np.nonzero(seeds != 255)
    moved = np.full_like(seeds, 255)
    moved[ys + 1, xs + 1] = seeds[ys, xs]                               # one pixel off each centre
    inputs["seeds"] = moved
    cfg = dataclasses.replace(FAST, a2gnn_rw=False, a2gnn_crf_preset="")
    _, index = run_method(cfg, inputs)
    assert float((np.array([0, 3])[index] == inputs["truth"]).mean()) > 0.9
    grid_probs, _ = run_method(dataclasses.replace(cfg, a2gnn_loss_resolution="grid"), inputs)
    np.testing.assert_array_equal(grid_probs, with_background(inputs["high_res"], cfg.cam_bg_threshold))
    with pytest.raises(ValueError, match="a2gnn_loss_resolution"):
        validate_propagation(dataclasses.replace(cfg, a2gnn_loss_resolution="pixels"))


def test_grid_boxes_whole_image_and_foreign_classes():
    keys = np.array([3, 7])
    boxes = np.array([[7, 0, 0, 79, 63], [5, 10, 10, 20, 20]])
    (box,) = grid_boxes(boxes, keys, (64, 80), (8, 10), 8, "img")
    assert box == GridBox(2, 0, 7, 0, 9)
    with pytest.raises(ValueError, match="img"):
        grid_boxes(np.array([[3, 0, 0, 80, 10]]), keys, (64, 80), (8, 10), 8, "img")
    assert grid_boxes(np.zeros((0, 5), np.int64), keys, (64, 80), (8, 10), 8, "img") == []


# --------------------------------------------------------------------------------------------- the method


def test_registration_and_schedules():
    method = PROPAGATION_METHODS.get("a2gnn")
    assert method.affinity_method == "a2gnn" and method.inputs.image and method.run_batch is not None
    cfg = PropagateConfig(propagation="a2gnn")
    validate_propagation(cfg, "a2gnn")
    with pytest.raises(ValueError, match="affinity_method"):
        validate_propagation(cfg, "irnet")
    image, box = resolve_schedule(cfg, "image"), resolve_schedule(cfg, "box")
    assert (image.lr, image.seed_epochs, image.gcrf_epochs, image.gcrf_weight) == (0.03, 50, 50, 0.3)
    assert image.random_walk and not image.multi_point
    assert (box.lr, box.seed_epochs, box.gcrf_epochs, box.gcrf_weight) == (0.035, 150, 150, 0.01)
    assert box.multi_point and not box.random_walk and not resolve_schedule(cfg, "scribble").random_walk
    custom = resolve_schedule(dataclasses.replace(cfg, a2gnn_lr=0.1, a2gnn_seed_epochs=3), "box")
    assert (custom.lr, custom.seed_epochs, custom.gcrf_epochs) == (0.1, 3, 150)
    with pytest.raises(ValueError, match="a2gnn_dropout"):
        validate_propagation(dataclasses.replace(cfg, a2gnn_dropout=1.0))
    with pytest.raises(ValueError, match="a2gnn_batch_images"):
        validate_propagation(dataclasses.replace(cfg, a2gnn_batch_images=0))
    with pytest.raises(ValueError, match="supervision"):
        resolve_schedule(cfg, "mask")


def test_seed_channels_follow_the_keys():
    seeds = np.array([[0, 3, 7], [255, 5, 3]], np.uint8)
    assert seed_channels(seeds, np.array([7, 3])).tolist() == [[0, 2, 1], [255, 255, 2]]


STRIDE = 8


def planted_inputs(height: int = 48, width: int = 64, seed: int = 0) -> dict:
    """Two regions: class 3 on the left 3/8 of the image, background elsewhere; window affinities and node
    features that know the regions (noisy), sparse seeds (two nodes per region), noisy weak CAMs."""
    rng = np.random.default_rng(seed)
    grid = (math.ceil(height / STRIDE), math.ceil(width / STRIDE))
    truth = np.zeros((height, width), np.uint8)
    truth[:, : 3 * width // 8] = 3
    cells = truth[STRIDE // 2::STRIDE, STRIDE // 2::STRIDE][: grid[0], : grid[1]]
    radius = 1
    window = np.zeros(((2 * radius + 1) ** 2, *grid), np.float32)
    padded = np.pad(cells.astype(np.int32), radius, constant_values=-1)
    for k, (dy, dx) in enumerate(window_offsets(radius)):
        other = padded[radius + dy:radius + dy + grid[0], radius + dx:radius + dx + grid[1]]
        window[k] = np.where(other == cells, 0.9, 0.05) * (other >= 0)
    features = np.abs(rng.normal(0, 0.3, (6, *grid))).astype(np.float32)
    features[0] += (cells == 3) * 1.0
    features[1] += (cells == 0) * 1.0
    seeds = np.full((height, width), 255, np.uint8)
    last_y, last_x = grid[0] - 1, grid[1] - 1
    for y, x in ((1, 0), (last_y - 1, 1), (1, last_x - 1), (last_y - 1, last_x)):   # cells; centres are sampled
        seeds[y * STRIDE + STRIDE // 2, x * STRIDE + STRIDE // 2] = cells[y, x]
    rgb = np.where(truth[..., None] == 3, 200, 40).astype(np.uint8).repeat(3, 2)
    rgb = np.clip(rgb + rng.integers(-10, 10, rgb.shape), 0, 255).astype(np.uint8)
    assert {int(cells[1, 0]), int(cells[1, last_x - 1])} == {0, 3}                # a seed in each region
    cam = np.clip(0.15 + 0.6 * (truth == 3) + rng.normal(0, 0.1, truth.shape), 0, 1).astype(np.float32)[None]
    return {"window_affinity": window, "node_features": features, "rgb": rgb, "seeds": seeds,
            "keys": np.array([3]), "high_res": cam, "truth": truth,
            "image_id": f"planted{seed}", "affinity_stride": np.asarray(STRIDE)}


FAST = PropagateConfig(propagation="a2gnn", a2gnn_hidden=32, a2gnn_seed_epochs=15, a2gnn_gcrf_epochs=15)


def run_method(cfg: PropagateConfig, inputs: dict, **extra) -> tuple[np.ndarray, np.ndarray]:
    affinity = {k: v for k, v in inputs.items() if k not in ("high_res", "truth")}
    affinity.update(num_labels=np.asarray(21), **extra)
    cams = {"cam": inputs["high_res"][:, ::4, ::4], "high_res": inputs["high_res"]}
    return PROPAGATION_METHODS.get("a2gnn").run(cfg, cams, affinity, inputs["truth"].shape, CPU)


def test_propagation_recovers_a_planted_layout_from_sparse_seeds():
    inputs = planted_inputs()
    probs, index = run_method(FAST, inputs)
    assert probs.shape == (2, 48, 64) and probs.dtype == np.float32 and index.dtype == np.uint8
    np.testing.assert_allclose(probs.sum(0), 1, atol=1e-4)
    accuracy = float((np.array([0, 3])[index] == inputs["truth"]).mean())
    assert accuracy > 0.9, accuracy                         # chance is ~0.5
    # The GNN alone (no random walk, no CRF) does it too: the seeds, not the CAM, carry the layout.
    _, alone = run_method(dataclasses.replace(FAST, a2gnn_rw=False, a2gnn_crf_preset=""), inputs)
    assert float((np.array([0, 3])[alone] == inputs["truth"]).mean()) > 0.9


def test_propagation_is_deterministic_per_image():
    inputs = planted_inputs(seed=1)
    cfg = dataclasses.replace(FAST, a2gnn_crf_preset="")
    first, second = run_method(cfg, inputs), run_method(cfg, inputs)
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    other = run_method(dataclasses.replace(cfg, a2gnn_seed=7), inputs)
    assert not np.array_equal(first[0], other[0])          # the seed does reach the weights


def test_empty_seeds_give_the_cam_scores():
    inputs = planted_inputs()
    inputs["seeds"][:] = 255
    probs, index = run_method(FAST, inputs)
    expected = with_background(inputs["high_res"], FAST.cam_bg_threshold)
    np.testing.assert_array_equal(probs, expected)
    np.testing.assert_array_equal(index, expected.argmax(0))


def test_whole_image_box_supervision():
    inputs = planted_inputs()
    cfg = dataclasses.replace(FAST, a2gnn_seed_epochs=5, a2gnn_gcrf_epochs=5, a2gnn_crf_preset="")
    boxes = np.array([[3, 0, 0, 63, 47]])
    probs, index = run_method(cfg, inputs, supervision="box", boxes=boxes)
    assert probs.shape == (2, 48, 64) and np.isfinite(probs).all() and index.shape == (48, 64)
    np.testing.assert_allclose(probs.sum(0), 1, atol=1e-5)
    without, _ = run_method(cfg, inputs, supervision="box", boxes=np.zeros((0, 5), np.int64))
    assert not np.allclose(probs, without)                  # the multi-point loss took part


def test_bad_inputs_are_named():
    inputs = planted_inputs()
    with pytest.raises(ValueError, match="keys"):
        run_method(FAST, {k: v for k, v in inputs.items() if k != "keys"})
    with pytest.raises(ValueError, match="planted0"):
        propagate_a2gnn(FAST, inputs["high_res"], inputs["window_affinity"], inputs["node_features"], inputs["rgb"],
                        inputs["seeds"][:10], inputs["keys"], "planted0", (48, 64))


def test_a2gnn_module_returns_logits_and_embedding():
    graph = WindowGraph.from_window_affinity(torch.rand(9, 3, 4))
    gen = torch.Generator().manual_seed(0)
    model = A2GNN(5, 3, hidden=8, generator=gen).eval()
    logits, embedding = model(torch.rand(12, 5), graph)
    assert logits.shape == (12, 3) and embedding.shape == (12, 8)
    assert 0 <= float(model.betas.detach().min()) and float(model.betas.detach().max()) <= 1


# ------------------------------------------------------------------------------------ many images at once


def test_batched_window_attention_and_model_match_single_images():
    gen = torch.Generator().manual_seed(8)
    graphs = [WindowGraph.from_window_affinity(torch.rand(25, 4, 6, generator=gen, dtype=torch.float64))
              for _ in range(3)]
    h = torch.randn(3, 24, 5, generator=gen, dtype=torch.float64)
    betas = torch.rand(3, generator=gen, dtype=torch.float64)
    stacked = WindowGraph.stack(graphs)
    want = torch.stack([window_attention(h[b], betas[b], graphs[b]) for b in range(3)])
    torch.testing.assert_close(window_attention(h, betas, stacked), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="grid"):
        WindowGraph.stack([graphs[0], WindowGraph.from_window_affinity(torch.rand(25, 4, 5))])
    # Initial weights and dropout masks per image from its own generator; padded classes masked out.
    features = torch.rand(2, 24, 7, generator=gen)
    model_graphs = [WindowGraph.from_window_affinity(torch.rand(25, 4, 6, generator=gen)) for _ in range(2)]
    batch = A2GNNBatch(7, [3, 2], hidden=8, generators=[torch.Generator().manual_seed(s) for s in (1, 2)])
    logits, embedding = batch(features, WindowGraph.stack(model_graphs))    # training mode: dropout is drawn
    for b, classes in enumerate((3, 2)):
        single = A2GNN(7, classes, hidden=8, generator=torch.Generator().manual_seed(b + 1))
        torch.testing.assert_close(batch.w_in[b], single.w_in)
        torch.testing.assert_close(batch.w_out[b, :, :classes], single.w_out)
        want_logits, want_embedding = single(features[b], model_graphs[b])
        torch.testing.assert_close(logits[b, :, :classes], want_logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(embedding[b], want_embedding, rtol=1e-5, atol=1e-6)
    assert bool((logits[1, :, 2] == -1e9).all())


def two_class_inputs(height: int, width: int, seed: int) -> dict:
    """planted_inputs with a second class (label 5) in the right quarter: its CAM plane, seeds and features."""
    inputs = planted_inputs(height, width, seed)
    grid = inputs["window_affinity"].shape[1:]
    inputs["truth"][:, 3 * width // 4:] = 5
    inputs["keys"] = np.array([3, 5])
    inputs["high_res"] = np.concatenate([inputs["high_res"], (inputs["truth"] == 5)[None].astype(np.float32)])
    inputs["node_features"][2, :, 3 * grid[1] // 4:] += 1.0
    inputs["node_features"][1, :, 3 * grid[1] // 4:] = 0.0
    seeds = inputs["seeds"]
    seeds[:, width // 2:] = 255                             # background and class-5 seeds on the right instead
    for y, x in ((1, grid[1] - 1), (grid[0] - 2, grid[1] - 2), (1, grid[1] // 2), (grid[0] - 2, grid[1] // 2)):
        seeds[y * STRIDE + STRIDE // 2, x * STRIDE + STRIDE // 2] = inputs["truth"][y * STRIDE, x * STRIDE]
    return inputs


def method_arguments(inputs: dict, supervision: str = "image", boxes: np.ndarray | None = None) -> dict:
    names = ("high_res", "window_affinity", "node_features", "rgb", "seeds", "keys", "image_id")
    return {**{k: inputs[k] for k in names}, "size": inputs["truth"].shape, "supervision": supervision,
            "boxes": boxes, "stride": int(inputs["affinity_stride"])}


@pytest.mark.parametrize("resolution", ["image", "grid"])
def test_many_images_train_together_and_match_the_per_image_path(monkeypatch, resolution):
    """Two grid sizes, image and box supervision, different class counts in one batch, an empty-seed image;
    losses at either resolution (images of a batch have different numbers of labelled pixels)."""
    empty = planted_inputs(48, 64, seed=3)
    empty["seeds"][:] = 255
    items = [method_arguments(planted_inputs(48, 64, seed=0)),
             method_arguments(planted_inputs(40, 56, seed=1), "box", np.array([[3, 0, 0, 20, 39]])),
             method_arguments(empty),
             method_arguments(two_class_inputs(48, 64, seed=2)),
             method_arguments(planted_inputs(40, 56, seed=4), "box", np.array([[3, 0, 0, 55, 39]]))]
    cfg = dataclasses.replace(FAST, a2gnn_crf_preset="", a2gnn_loss_resolution=resolution)
    batch_sizes = []
    train_batch = stages.propagation.a2gnn.train_a2gnn_batch

    def counted(features, *args, **kwargs):
        batch_sizes.append(features.shape[0])
        return train_batch(features, *args, **kwargs)

    monkeypatch.setattr(stages.propagation.a2gnn, "train_a2gnn_batch", counted)
    together = propagate_a2gnn_many(cfg, items, CPU)
    assert sorted(batch_sizes) == [2, 2]                    # (48x64, image) and (40x56, box); the empty one: none
    alone = [propagate_a2gnn(cfg, **item, device=CPU) for item in items]
    for item, (probs, index), (want_probs, want_index) in zip(items, together, alone):
        assert probs.shape == want_probs.shape == (len(item["keys"]) + 1, *item["size"])
        np.testing.assert_allclose(probs, want_probs, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(index, want_index)
    np.testing.assert_array_equal(together[2][0], with_background(empty["high_res"], cfg.cam_bg_threshold))
    # The images did train (not a trivial agreement): the two-class image finds its second class.
    assert {0, 1, 2} <= set(np.unique(together[3][1]).tolist())


def cam_maps(label: np.ndarray, keys: list[int], rng: np.random.Generator) -> np.ndarray:
    """MakeCAM-like scores: each class's blurred mask plus noise, scaled to a maximum of 1."""
    planes = []
    for key in keys:
        blurred = cv2.GaussianBlur((label == key).astype(np.float32), (0, 0), 3.0)
        plane = np.clip(blurred + rng.normal(0, 0.05, blurred.shape), 0, None)
        planes.append(plane / max(float(plane.max()), 1e-6))
    return np.stack(planes).astype(np.float32) if planes else np.zeros((0, *label.shape), np.float32)


def test_propagate_images_batch_size_does_not_change_the_labels(tiny_manifest, tmp_path, monkeypatch):
    space, layout = tiny_manifest.label_space, tiny_manifest.layout
    ids = tiny_manifest.splits["train"][:5]
    rng = np.random.default_rng(0)
    with DenseMapWriter(tmp_path / "cams.h5") as cam_writer:
        for image_id in ids:
            label = layout.read_label(image_id)
            keys = sorted(int(k) for k in np.unique(label) if 0 < k < space.ignore_index)
            high = cam_maps(label, keys, rng)
            cam_writer.write(image_id, {"high_res": high, "cam": high[:, ::4, ::4]}, {"keys": np.asarray(keys)})
    seeds_dir = tmp_path / "seeds"
    for n, image_id in enumerate(ids):
        seeds = layout.read_label(image_id).copy()
        seeds[rng.random(seeds.shape) < 0.7] = space.ignore_index
        if n == 2:
            seeds[:] = space.ignore_index                   # the CAM fallback, between batched images
        path = label_file(seeds_dir, image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_label_png(path, seeds, space.palette)
    cfg = PropagateConfig(propagation="a2gnn", a2gnn_hidden=32, a2gnn_seed_epochs=5, a2gnn_gcrf_epochs=5)
    inputs = affinity_net_inputs(_tiny_affinity_net(radius=2).eval(), CPU)   # untrained: fine here

    def run(name: str, batch_images: int) -> tuple[list[np.ndarray], dict[str, np.ndarray], list[str]]:
        out = tmp_path / name
        with DenseMapWriter(out / "probs.h5") as writer:
            meta = propagate_images(dataclasses.replace(cfg, a2gnn_batch_images=batch_images), tiny_manifest, ids,
                                    DenseMapReader([tmp_path / "cams.h5"]), seeds_dir, inputs, out, writer, CPU)
        assert meta["cam_fallback_images"] == [ids[2]]
        reader = DenseMapReader([out / "probs.h5"])
        labels = [read_label_png(label_file(out, image_id), space) for image_id in ids]
        return labels, {i: reader.read(i, ["probs"])[0]["probs"] for i in ids}, reader.ids()

    calls = []
    method = stages.propagation.a2gnn.METHOD
    many = method.run_batch
    monkeypatch.setattr(stages.propagation.a2gnn, "METHOD", dataclasses.replace(
        method, run_batch=lambda c, batch, d: calls.append(len(batch)) or many(c, batch, d)))
    one_labels, one_probs, one_order = run("one", 1)
    four_labels, four_probs, four_order = run("four", 4)
    assert calls == [1, 1, 1, 1, 3, 1]                      # batch 4: the fallback image takes a slot
    monkeypatch.setattr(stages.propagation.a2gnn, "METHOD", dataclasses.replace(method, run_batch=None, batch_knob=""))
    ref_labels, ref_probs, ref_order = run("reference", 4)  # the per-image method
    assert one_order == four_order == ref_order == list(ids)
    for labels, probs in ((one_labels, one_probs), (four_labels, four_probs)):
        for got, want in zip(labels, ref_labels):
            np.testing.assert_array_equal(got, want)
        for image_id in ids:
            np.testing.assert_allclose(probs[image_id], ref_probs[image_id], rtol=0, atol=2e-3)  # stored float16
    assert any(len(np.unique(label)) > 1 for label in ref_labels)


# ------------------------------------------------------------------------------------ affinity training


def gt_seed_label(manifest: Manifest, drop: float = 0.3):
    def seed_label(image_id: str) -> np.ndarray:
        label = manifest.layout.read_label(image_id).copy()
        rng = np.random.default_rng(zlib.crc32(image_id.encode()))
        label[rng.random(label.shape) < drop] = 255
        return label
    return seed_label


def test_train_affinity_a2gnn_and_reload(tiny_manifest, tmp_path):
    cfg = TrainAffinityConfig(affinity_method="a2gnn", window_radius=3, num_epochs=1, batch_size=4, crop_size=64,
                              scale_range=(1.0, 1.0), freeze_backbone=False, init_from_cam=False, lr=0.01)
    ids = tiny_manifest.splits["train"][:4]
    metrics = train_affinity(cfg, tiny_manifest, ids, gt_seed_label(tiny_manifest), None, tmp_path, CPU)
    assert math.isfinite(metrics["final_loss"]) and metrics["steps"] == 1
    log = (tmp_path / "log.csv").read_text()
    assert "gated" in log.splitlines()[0]
    model = load_affinity_model(cfg, tmp_path, CPU)
    assert isinstance(model, A2GNNAffinityNet) and model.window_radius == 3
    rgb = tiny_manifest.layout.read_image(ids[0])
    out = infer_affinity_input(model, rgb, CPU)
    grid = (math.ceil(rgb.shape[0] / 8), math.ceil(rgb.shape[1] / 8))
    assert out["window_affinity"].shape == (49, *grid) and int(out["affinity_stride"]) == 8
    assert out["node_features"].shape == (sum(model.backbone.tap_channels[-3:]), *grid)
    np.testing.assert_allclose(out["window_affinity"][24], 1.0, rtol=0, atol=1e-6)   # a_ii = exp(0)
    assert float(out["window_affinity"][0, 0, 0]) == 0.0                                # off the grid
    assert (out["window_affinity"] <= 1).all() and (out["window_affinity"] >= 0).all()


@pytest.mark.parametrize("supervision", ["image", "box"])
def test_reference_schedule_on_a_demo_size_image(supervision):
    """Every a2gnn_* knob at its reference value (50 + 50 epochs, or 150 + 150 for boxes; 256 hidden; random
    walk and CRF) on a 112x144 planted image."""
    inputs = planted_inputs(112, 144, seed=2)
    boxes = np.array([[3, 0, 0, 3 * 144 // 8 - 1, 111]])
    probs, index = run_method(PropagateConfig(propagation="a2gnn"), inputs, supervision=supervision, boxes=boxes)
    assert probs.shape == (2, 112, 144)
    assert float((np.array([0, 3])[index] == inputs["truth"]).mean()) > 0.9


@pytest.mark.cuda
def test_window_attention_on_cuda_matches_cpu(cuda_device):
    gen = torch.Generator().manual_seed(9)
    window = torch.rand(25, 4, 6, generator=gen, dtype=torch.float64)
    h = torch.randn(24, 5, generator=gen, dtype=torch.float64)
    beta = torch.rand((), generator=gen, dtype=torch.float64)
    on_device = WindowGraph.from_window_affinity(window.to(cuda_device))
    torch.testing.assert_close(window_attention(h.to(cuda_device), beta.to(cuda_device), on_device).cpu(),
                               window_attention(h, beta, WindowGraph.from_window_affinity(window)),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.cuda
def test_batched_a2gnn_on_cuda_matches_per_image_and_recovers_the_layout(cuda_device):
    empty = planted_inputs(48, 64, seed=3)
    empty["seeds"][:] = 255
    planted = planted_inputs(48, 64, seed=0)
    items = [method_arguments(planted), method_arguments(two_class_inputs(48, 64, seed=2)), method_arguments(empty),
             method_arguments(planted_inputs(40, 56, seed=1), "box", np.array([[3, 0, 0, 20, 39]]))]
    cfg = dataclasses.replace(FAST, a2gnn_crf_preset="")
    together = propagate_a2gnn_many(cfg, items, cuda_device)
    alone = [propagate_a2gnn(cfg, **item, device=cuda_device) for item in items]
    for (probs, index), (want_probs, want_index) in zip(together, alone):
        np.testing.assert_allclose(probs, want_probs, rtol=0, atol=1e-4)
        assert float((index == want_index).mean()) >= 0.999
    # CUDA draws other initial weights than the CPU (generators differ per device): compare with the layout.
    for _probs, index in (together[0], propagate_a2gnn(cfg, **items[0], device=CPU)):
        assert float((np.array([0, 3])[index] == planted["truth"]).mean()) > 0.9
    assert {0, 1, 2} <= set(np.unique(together[1][1]).tolist())

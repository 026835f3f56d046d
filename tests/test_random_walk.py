"""Sparse random walk against the dense squaring reference, IRN's padded boundary graph and PSA's features."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.pairs import half_disc_offsets, line_path
from stages.propagation.random_walk import (
    boundary_affinities,
    feature_affinities,
    propagate_irn,
    propagate_psa,
    random_walk,
    random_walk_dense,
    transition_matrix,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def dense_from_edges(num_nodes: int, src: torch.Tensor, dst: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    a = torch.zeros(num_nodes, num_nodes, dtype=torch.float64)
    a[src, dst] = weight.double()
    a[dst, src] = weight.double()
    a.fill_diagonal_(1.0)
    return a


def padded_irn_affinity(boundary: np.ndarray, radius: int) -> np.ndarray:
    """IRN literally: pad B with 1.0 (left, right, bottom), pair every source of the padded grid's interior
    rows [0, Hp-(r-1)) x cols [r-1, Wp-(r-1)), a = 1 - max B on the path, dense symmetric A, crop the pad."""
    h, w = boundary.shape
    padded = np.pad(boundary, ((0, radius), (radius, radius)), constant_values=1.0)
    hp, wp = padded.shape
    a = np.eye(hp * wp)
    for y in range(hp - (radius - 1)):
        for x in range(radius - 1, wp - (radius - 1)):
            for dy, dx in half_disc_offsets(radius):
                value = 1 - max(padded[y + py, x + px] for py, px in line_path(dy, dx))
                i, j = y * wp + x, (y + dy) * wp + x + dx
                a[i, j] = a[j, i] = value
    a = a.reshape(hp, wp, hp, wp)[:h, radius:radius + w, :h, radius:radius + w]
    return a.reshape(h * w, h * w)


@pytest.mark.parametrize("radius", [3, 5])
def test_boundary_graph_equals_irn_padded_graph(radius):
    rng = np.random.default_rng(radius)
    boundary = rng.uniform(0, 1, (7, 9)).astype(np.float32)
    src, dst, weight = boundary_affinities(torch.from_numpy(boundary), radius)
    ours = dense_from_edges(boundary.size, src, dst, weight).numpy()
    np.testing.assert_allclose(ours, padded_irn_affinity(boundary, radius), atol=1e-6)


def test_boundary_affinity_is_one_minus_path_max():
    boundary = torch.zeros(6, 6)
    boundary[2, 3] = 0.8  # on the line from (0, 3) to (4, 3) only, among the pairs checked below
    src, dst, weight = boundary_affinities(boundary, 5)
    pairs = {(int(s), int(d)): float(v) for s, d, v in zip(src, dst, weight)}
    assert pairs[(0 * 6 + 3, 4 * 6 + 3)] == pytest.approx(0.2)
    assert pairs[(0 * 6 + 0, 4 * 6 + 0)] == pytest.approx(1.0)
    assert len(pairs) == len(src)  # no pair listed twice


def test_feature_affinity_and_interior_sources():
    rng = np.random.default_rng(1)
    features = torch.from_numpy(rng.normal(size=(4, 9, 11)).astype(np.float32))
    radius, reach = 5, 4
    src, dst, weight = feature_affinities(features, radius)
    every_src, _, _ = feature_affinities(features, radius, interior_sources=False)
    ys, xs = src // 11, src % 11
    assert bool((ys < 9 - reach).all() and (xs >= reach).all() and (xs < 11 - reach).all())
    assert len(every_src) > len(src)
    assert len(src) == len(half_disc_offsets(radius)) * (9 - reach) * (11 - 2 * reach)
    k = 7
    s, d = int(src[k]), int(dst[k])
    f = features.reshape(4, -1)
    assert float(weight[k]) == pytest.approx(math.exp(-float((f[:, s] - f[:, d]).abs().mean())), rel=1e-5)


@pytest.mark.parametrize("kind", ["boundary", "features"])
def test_transition_is_column_stochastic_and_symmetric_before_normalising(kind):
    rng = np.random.default_rng(2)
    if kind == "boundary":
        edges = boundary_affinities(torch.from_numpy(rng.uniform(0, 1, (8, 10)).astype(np.float32)), 5)
    else:
        edges = feature_affinities(torch.from_numpy(rng.normal(size=(3, 8, 10)).astype(np.float32)), 5, False)
    t = transition_matrix(80, *edges, beta=8.0)
    assert t.layout == torch.sparse_csc
    dense_t = t.to_dense().double()
    np.testing.assert_allclose(dense_t.sum(0).numpy(), 1.0, atol=1e-5)
    powered = dense_from_edges(80, *edges) ** 8
    np.testing.assert_allclose(dense_t.numpy(), (powered / powered.sum(0, keepdim=True)).numpy(), atol=1e-6)


def test_repeated_pairs_add_up_and_any_sparse_layout_walks():
    src, dst = torch.tensor([0, 1, 0]), torch.tensor([1, 2, 1])
    weight = torch.tensor([0.5, 0.8, 0.25])
    t = transition_matrix(3, src, dst, weight, beta=1.0)
    a = torch.tensor([[1.0, 0.75, 0.0], [0.75, 1.0, 0.8], [0.0, 0.8, 1.0]])
    expected = a / a.sum(0, keepdim=True)
    np.testing.assert_allclose(t.to_dense().numpy(), expected.numpy(), rtol=1e-6)
    seeds = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    for layout_t in (t, t.to_dense().to_sparse(), t.to_dense().to_sparse_csr()):
        np.testing.assert_allclose(random_walk(layout_t, seeds, 3).numpy(), (seeds @ expected.matrix_power(3)).numpy(),
                                   rtol=1e-5)


@pytest.mark.parametrize("kind", ["boundary", "features"])
@pytest.mark.parametrize("steps", [1, 8, 256])
def test_sparse_walk_equals_dense_squaring(kind, steps):
    rng = np.random.default_rng(steps)
    h, w = 9, 12
    if kind == "boundary":
        edges, beta = boundary_affinities(torch.from_numpy(rng.uniform(0, 1, (h, w)).astype(np.float32)), 5), 10.0
    else:
        edges, beta = feature_affinities(torch.from_numpy(rng.normal(size=(5, h, w)).astype(np.float32)), 5), 8.0
    seeds = torch.from_numpy(rng.uniform(0, 1, (3, h * w)).astype(np.float32))
    sparse = random_walk(transition_matrix(h * w, *edges, beta), seeds, steps)
    dense = random_walk_dense(h * w, *edges, beta, steps, seeds)
    # float32 both ways; 256 sparse steps round more often than 8 squarings
    np.testing.assert_allclose(sparse.numpy(), dense.numpy(), rtol=5e-4, atol=1e-6)
    if steps == 1:  # one step moves mass: not the identity
        assert not torch.allclose(sparse, seeds)


def two_region_case(height: int, width: int):
    """Two CAM blobs (left, right) separated by a full-height boundary column in the middle."""
    h, w = math.ceil(height / 4), math.ceil(width / 4)
    cam = np.zeros((2, h, w), np.float32)
    cam[0, h // 2 - 1:h // 2 + 1, 1:3] = 1.0
    cam[1, h // 2 - 1:h // 2 + 1, w - 3:w - 1] = 0.9
    boundary = np.zeros((h, w), np.float32)
    boundary[:, w // 2] = 1.0
    return cam, boundary, w // 2 * 4


@pytest.mark.parametrize("image_size", [(38, 45), (8, 2100)])
def test_propagate_irn_keeps_separated_classes_apart(image_size):
    cam, boundary, wall = two_region_case(*image_size)
    scores, label = propagate_irn(cam, boundary, image_size)
    height, width = image_size
    assert scores.shape == (3, height, width) and scores.dtype == np.float32
    assert label.shape == (height, width) and label.dtype == np.uint8
    np.testing.assert_allclose(scores[0], 0.25)
    assert scores[1:].max() == pytest.approx(1.0)
    mid = height // 2
    assert label[mid, 4] == 1 and label[mid, width - 6] == 2
    assert not (label[:, :wall] == 2).any() and not (label[:, wall + 4:] == 1).any()
    # mass spreads from the seeds: more pixels are class 1 than the seeded block
    assert (label == 1).sum() > 2 * 2 * 16


def test_propagate_irn_sparse_labels_equal_dense_reference():
    rng = np.random.default_rng(3)
    cam, boundary, _ = two_region_case(40, 52)
    boundary = np.maximum(boundary, rng.uniform(0, 0.3, boundary.shape).astype(np.float32))
    cam = cam + rng.uniform(0, 0.2, cam.shape).astype(np.float32)
    sparse_scores, sparse_label = propagate_irn(cam, boundary, (40, 52))
    dense_scores, dense_label = propagate_irn(cam, boundary, (40, 52), dense_reference=True)
    np.testing.assert_allclose(sparse_scores, dense_scores, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(sparse_label, dense_label)


def psa_case(height: int, width: int):
    """Two 3x3-node objects (left, right) whose features differ from the background and from each other;
    the CAM covers each object except one node (a hole of weak CAM the walk should fill)."""
    h8, w8 = math.ceil(height / 8), math.ceil(width / 8)
    rows = slice(h8 // 2 - 1, h8 // 2 + 2)
    left, right = slice(5, 8), slice(w8 - 8, w8 - 5)
    features = np.zeros((6, h8, w8), np.float32)
    features[:, rows, left] = 10.0  # exp(-10)^8 ~ 1e-35: nothing crosses
    features[:, rows, right] = 20.0
    cam = np.zeros((2, height, width), np.float32)
    for k, cols, value in ((0, left, 0.9), (1, right, 0.8)):
        cam[k, rows.start * 8:rows.stop * 8, cols.start * 8:cols.stop * 8] = value
    hole = (h8 // 2 * 8 + 4, 6 * 8 + 4)
    cam[0, hole[0] - 4:hole[0] + 4, hole[1] - 4:hole[1] + 4] = 0.02
    return cam, features, hole


@pytest.mark.parametrize("image_size", [(128, 160), (96, 1040)])
def test_propagate_psa_fills_objects_and_keeps_them_apart(image_size):
    cam, features, hole = psa_case(*image_size)
    height, width = image_size
    assert np.argmax([(1 - cam.max(0)[hole]) ** 16, *cam[:, hole[0], hole[1]]]) == 0  # seeds call it background
    scores, label = propagate_psa(cam, features)
    assert scores.shape == (3, height, width) and label.shape == (height, width) and label.dtype == np.uint8
    assert label[hole] == 1  # filled from the rest of its object
    assert label[hole[0], width - 6 * 8 - 4] == 2
    assert label[4, width // 2] == 0 and label[height - 4, 4] == 0
    assert not (label[:, :width // 2] == 2).any() and not (label[:, width // 2:] == 1).any()
    assert np.isfinite(scores).all() and scores.min() >= 0


def test_propagate_psa_sparse_labels_equal_dense_reference():
    rng = np.random.default_rng(4)
    cam, features, _ = psa_case(88, 120)
    features = features + rng.normal(0, 0.5, features.shape).astype(np.float32)
    cam = np.clip(cam + rng.uniform(0, 0.3, cam.shape).astype(np.float32), 0, 1)
    sparse_scores, sparse_label = propagate_psa(cam, features, alpha=4.0)
    dense_scores, dense_label = propagate_psa(cam, features, alpha=4.0, dense_reference=True)
    np.testing.assert_allclose(sparse_scores, dense_scores, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(sparse_label, dense_label)


def test_bad_arguments_name_the_argument():
    cam, boundary, _ = two_region_case(16, 16)
    with pytest.raises(ValueError, match="beta"):
        propagate_irn(cam, boundary, (16, 16), beta=0)
    with pytest.raises(ValueError, match="steps"):
        propagate_irn(cam, boundary, (16, 16), steps=0)
    with pytest.raises(ValueError, match="boundary"):
        propagate_irn(cam, boundary[:, :-1], (16, 16))
    with pytest.raises(ValueError, match="cam"):
        propagate_irn(cam, boundary, (32, 16))
    psa_cam, features, _ = psa_case(40, 88)
    with pytest.raises(ValueError, match="alpha"):
        propagate_psa(psa_cam, features, alpha=0)
    with pytest.raises(ValueError, match="features"):
        propagate_psa(psa_cam, features[:, :-1])
    edges = boundary_affinities(torch.from_numpy(boundary), 5)
    with pytest.raises(ValueError, match="steps"):
        random_walk_dense(16, *edges, 10.0, 6, torch.ones(1, 16))
    with pytest.raises(ValueError, match="seeds"):
        random_walk(transition_matrix(16, *edges, 10.0), torch.ones(1, 15), 4)
    with pytest.raises(ValueError, match="node ids"):
        transition_matrix(8, *edges, 10.0)


@pytest.mark.cuda
def test_cuda_matches_cpu(cuda_device):
    cam, boundary, _ = two_region_case(120, 160)
    cpu_scores, cpu_label = propagate_irn(cam, boundary, (120, 160))
    gpu_scores, gpu_label = propagate_irn(cam, boundary, (120, 160), device=cuda_device)
    np.testing.assert_allclose(cpu_scores, gpu_scores, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(cpu_label, gpu_label)
    # IRN's own form, T^t by squaring on the device, against the sparse walk on the device.
    dense_scores, dense_label = propagate_irn(cam, boundary, (120, 160), device=cuda_device, dense_reference=True)
    np.testing.assert_allclose(gpu_scores, dense_scores, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(gpu_label, dense_label)


@pytest.mark.cuda
def test_psa_walk_on_cuda_matches_cpu(cuda_device):
    rng = np.random.default_rng(4)
    cam, features, hole = psa_case(88, 120)
    features = features + rng.normal(0, 0.5, features.shape).astype(np.float32)
    cpu_scores, cpu_label = propagate_psa(cam, features, alpha=4.0)
    gpu_scores, gpu_label = propagate_psa(cam, features, alpha=4.0, device=cuda_device)
    np.testing.assert_allclose(cpu_scores, gpu_scores, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(cpu_label, gpu_label)
    assert gpu_label[hole] == 1                             # not a trivial agreement: the walk filled the hole

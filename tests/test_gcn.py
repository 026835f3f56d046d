"""WSGCN-I propagation (stages/propagation/gcn.py): partial-label rules, adjacency, batched per-image GCN training."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import stages.propagation.gcn as gcn_module
from data.labelspace import IGNORE_INDEX
from stages.config import PropagateConfig
from stages.propagation import PROPAGATION_METHODS
from stages.propagation.gcn import (
    GCNGraph,
    GCNTraining,
    dense_walk_power,
    gcn_adjacency,
    partial_labels,
    propagate_gcn,
    smoothness_edges,
    topk_walk_power,
    train_gcns,
)
from stages.propagation.propagate import validate_propagation
from stages.propagation.random_walk import boundary_affinities, transition_matrix
from stages.runtime import image_seed

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = PropagateConfig(propagation="gcn")


# ------------------------------------------------------------------------------------------ partial labels

# One row of pixels, one class. Columns: CAM value, la CRF (bg, class), ha CRF (bg, class), expected label.
# Class region (bg32 = (1 - c)^32 < c): 14 values above 0.1, cut floor(0.7 * 14) = 9 -> sorted[9] = 0.96, so
# only 0.97..1.0 are confident CAM pixels.
ROWS = [
    (1.00, (0.05, 0.95), (0.05, 0.95), 1),        # every rule holds
    (0.99, (0.10, 0.90), (0.85, 0.15), IGNORE_INDEX),   # ha says background, S = [0.85, 0.90] votes class: vote fails
    (0.98, (0.30, 0.70), (0.30, 0.70), IGNORE_INDEX),   # CRF confidence 0.7 < 0.8
    (0.97, (0.05, 0.95), (0.05, 0.95), 1),
    (0.96, (0.05, 0.95), (0.05, 0.95), IGNORE_INDEX),   # not in the top 30% of the class's CAM
    *[(c, (0.05, 0.95), (0.05, 0.95), IGNORE_INDEX) for c in (0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.12)],
    (0.00, (0.90, 0.10), (0.95, 0.05), 0),        # confident background
    (0.05, (0.90, 0.10), (0.95, 0.05), IGNORE_INDEX),   # background argmax, but (1 - 0.05)^32 = 0.19 <= 0.8
    (0.00, (0.90, 0.10), (0.70, 0.30), IGNORE_INDEX),   # CRF confidence 0.7 < 0.8
]


def fake_crf(monkeypatch, la: np.ndarray, ha: np.ndarray) -> None:
    """The CRF's output is given; calls come la (alpha 4) first, then ha (alpha 32), as partial_labels makes them."""
    outputs = iter([la, ha])

    def crf(rgb, scores, gaussian, bilateral, iterations):
        assert (gaussian, bilateral, iterations) == ((4.0, 3.0), (20.0, 3.0, 10.0), 10)  # WSGCN's CRF
        assert scores.shape[1:] == rgb.shape[:2]
        assert scores.shape[0] == la.shape[0], "the CRF sees background + the present classes only (WSGCN)"
        return next(outputs)

    monkeypatch.setattr(gcn_module, "dense_crf", crf)


def row_inputs(rows=ROWS) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    cam = np.asarray([[[r[0] for r in rows]]], np.float32)                 # (1, 1, n)
    la = np.asarray([[r[1][i] for r in rows] for i in range(2)], np.float32)[:, None]
    ha = np.asarray([[r[2][i] for r in rows] for i in range(2)], np.float32)[:, None]
    return cam, la, ha, np.zeros((1, len(rows), 3), np.uint8)


def test_partial_label_rules_each_can_fail(monkeypatch):
    cam, la, ha, rgb = row_inputs()
    fake_crf(monkeypatch, la, ha)
    label = partial_labels(rgb, cam, CFG)
    assert label.dtype == np.uint8
    assert label[0].tolist() == [r[3] for r in ROWS]


def test_cam_floor_changes_the_percentile_cut(monkeypatch):
    cam, la, ha, rgb = row_inputs()
    fake_crf(monkeypatch, la, ha)
    # Only 9 values above 0.3: cut floor(0.7 * 9) = 6 -> sorted[6] = 0.98, so 0.97 is no longer confident.
    label = partial_labels(rgb, cam, dataclasses.replace(CFG, gcn_cam_floor=0.3))
    assert label[0, 3] == IGNORE_INDEX and label[0, 0] == 1


def test_background_needs_the_la_crf_to_keep_background_somewhere(monkeypatch):
    cam, la, ha, rgb = row_inputs()
    la[0, :, 14:], la[1, :, 14:] = 0.1, 0.9  # the la CRF says "class" everywhere: no background plane left
    fake_crf(monkeypatch, la, ha)
    label = partial_labels(rgb, cam, CFG)
    assert label[0, 14] == IGNORE_INDEX, "confident background requires background in the la argmax"
    assert label[0, 0] == 1


def test_class_without_cam_above_floor_gets_no_label(monkeypatch):
    rows = [(0.1, (0.05, 0.95), (0.05, 0.95), None)] * 4 + [(0.0, (0.9, 0.1), (0.95, 0.05), None)]
    cam, la, ha, rgb = row_inputs(rows)
    fake_crf(monkeypatch, la, ha)
    label = partial_labels(rgb, cam, CFG)
    assert label[0].tolist() == [IGNORE_INDEX] * 4 + [0]


def test_partial_labels_with_the_real_crf_on_a_clear_cam():
    """A bright square CAM on a matching bright square: its core labelled class, far background labelled 0."""
    rgb = np.full((16, 20, 3), 40, np.uint8)
    rgb[4:12, 6:14] = 220
    cam = np.zeros((1, 16, 20), np.float32)
    yy, xx = np.mgrid[0:16, 0:20]
    cam[0] = np.clip(1 - np.hypot(yy - 7.5, xx - 9.5) / 6, 0, 1)
    label = partial_labels(rgb, cam, CFG)
    assert label[7, 9] == 1 and label[0, 0] == 0
    assert set(np.unique(label)) <= {0, 1, IGNORE_INDEX}
    assert (label == IGNORE_INDEX).any(), "the uncertain ring stays unlabelled"


# ------------------------------------------------------------------------------------------------ graph


def random_boundary(h: int = 6, w: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).uniform(0, 0.6, (h, w)).astype(np.float32))


def test_dense_adjacency_is_row_stochastic_and_symmetric_before_normalisation():
    boundary = random_boundary()
    n = boundary.numel()
    power = dense_walk_power(transition_matrix(n, *boundary_affinities(boundary, 3), 10.0), 8)
    torch.testing.assert_close(power.sum(0), torch.ones(n), atol=1e-5, rtol=0)  # T^t stays column-stochastic
    assert not torch.allclose(power, power.T, atol=1e-4), "T^t itself is not symmetric: the max matters"
    adjacency = gcn_adjacency(boundary, 10.0, 3, 8, "dense")
    torch.testing.assert_close(adjacency.sum(1), torch.ones(n), atol=1e-5, rtol=0)
    unnormalised = torch.maximum(power, power.T) + torch.eye(n)
    torch.testing.assert_close(adjacency * unnormalised.sum(1, keepdim=True), unnormalised, atol=1e-6, rtol=1e-5)
    # Row normalisation of a symmetric matrix: D A is symmetric again.
    row_sums = unnormalised.sum(1, keepdim=True)
    torch.testing.assert_close(adjacency * row_sums, (adjacency * row_sums).T, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("block", [None, 5])
def test_topk_equals_dense_when_k_covers_every_node(block):
    boundary = random_boundary(5, 6, seed=1)
    n = boundary.numel()
    transition = transition_matrix(n, *boundary_affinities(boundary, 3), 10.0)
    rows, cols, values = topk_walk_power(transition, 8, k=n, block=block)
    rebuilt = torch.zeros(n, n).index_put_((rows, cols), values)
    torch.testing.assert_close(rebuilt, dense_walk_power(transition, 8), atol=1e-6, rtol=1e-5)
    dense = gcn_adjacency(boundary, 10.0, 3, 8, "dense")
    sparse = gcn_adjacency(boundary, 10.0, 3, 8, "topk", topk=n)
    assert sparse.layout == torch.sparse_csr
    torch.testing.assert_close(sparse.to_dense(), dense, atol=1e-6, rtol=1e-5)


def test_topk_keeps_k_per_column_and_stays_symmetric_and_row_stochastic():
    boundary = random_boundary(6, 8, seed=2)
    n, k = boundary.numel(), 4
    transition = transition_matrix(n, *boundary_affinities(boundary, 3), 10.0)
    _, cols, values = topk_walk_power(transition, 6, k=k)
    assert torch.bincount(cols, minlength=n).max() <= k
    power = dense_walk_power(transition, 6)
    for j in (0, n // 2, n - 1):  # the kept entries are the column's largest
        kept = values[cols == j].sort(descending=True).values
        torch.testing.assert_close(kept, power[:, j].sort(descending=True).values[:kept.numel()], atol=1e-6, rtol=0)
    adjacency = gcn_adjacency(boundary, 10.0, 3, 6, "topk", topk=k).to_dense()
    torch.testing.assert_close(adjacency.sum(1), torch.ones(n), atol=1e-5, rtol=0)
    assert torch.equal(adjacency > 0, (adjacency > 0).T), "max(P, P^T) has a symmetric support"
    assert (adjacency.diagonal() > 0).all()


def test_dense_mode_refuses_large_images_naming_them():
    boundary = torch.zeros(40, 40)
    with pytest.raises(ValueError, match=r"'img_7'.*gcn_adjacency = topk"):
        gcn_adjacency(boundary, 10.0, 5, 4, "dense", dense_max_mib=1, name="'img_7'")


def test_smoothness_edges_are_the_5x5_window():
    rgb = np.zeros((4, 5, 3), np.uint8)
    src, dst, weight = smoothness_edges(rgb)
    pairs = {(int(s), int(d)) for s, d in zip(src, dst)}
    assert len(pairs) == src.numel(), "each unordered pair once"
    assert (0, 1) in pairs and (0, 2) in pairs and (0, 12) in pairs and (0, 3) not in pairs and (0, 15) not in pairs
    # 4-neighbour, black image: exp(-1/20); two steps diagonal: exp(-8/20)
    w = {(int(s), int(d)): float(v) for s, d, v in zip(src, dst, weight)}
    assert math.isclose(w[(0, 1)], math.exp(-1 / 20), rel_tol=1e-6)
    assert math.isclose(w[(0, 12)], math.exp(-8 / 20), rel_tol=1e-6)
    rgb[0, 1] = 255
    _, _, brighter = smoothness_edges(rgb)
    assert brighter[0] < weight[0], "a colour difference lowers the weight"


# --------------------------------------------------------------------------------------------- training


def toy_graph(seed: int, nodes_per_cluster: int = 12, classes: int = 2, dense: bool = False,
              feature_dim: int = 8) -> GCNGraph:
    """Two clusters (ring graphs), features = noisy cluster centre; one or two labelled nodes per cluster."""
    rng = np.random.default_rng(seed)
    n = 2 * nodes_per_cluster
    centres = rng.normal(0, 1, (2, feature_dim))
    cluster = np.repeat([0, 1], nodes_per_cluster)
    features = centres[cluster] + rng.normal(0, 0.8, (n, feature_dim))
    adjacency = np.eye(n)
    for c in range(2):
        ids = np.arange(nodes_per_cluster) + c * nodes_per_cluster
        for a, b in zip(ids, np.roll(ids, 1)):
            adjacency[a, b] = adjacency[b, a] = 1
        for a, b in zip(ids, np.roll(ids, 2)):
            adjacency[a, b] = adjacency[b, a] = 0.5
    adjacency /= adjacency.sum(1, keepdims=True)
    adj = torch.tensor(adjacency, dtype=torch.float32)
    labels = torch.full((n,), IGNORE_INDEX, dtype=torch.long)
    labels[[0, 1]] = 0
    labels[[nodes_per_cluster, nodes_per_cluster + 1]] = classes - 1
    src = torch.arange(n - 1)
    return GCNGraph(features=torch.tensor(features, dtype=torch.float32),
                    adjacency=adj if dense else adj.to_sparse_csr(), labels=labels, num_classes=classes,
                    smooth=(src, src + 1, torch.full((n - 1,), 0.5)), seed=seed, entropy_classes=None,
                    name=f"toy {seed}")


FAST = GCNTraining(epochs=60)


def test_block_adjacency_product_and_gradient_equal_autograd_on_the_block_matrix():
    """Dense and sparse graphs in one operator: Â x and its gradient equal plain autograd's on the block-diagonal
    matrix. Each Â is row-normalised and not symmetric, so a backward without the transpose fails."""
    generator = torch.Generator().manual_seed(0)
    matrices, graphs, offsets = [], [], [0]
    for i, (n, dense) in enumerate([(6, True), (9, False), (7, True)]):
        matrix = torch.rand(n, n, generator=generator) * (torch.rand(n, n, generator=generator) < 0.6) + torch.eye(n)
        matrix = matrix / matrix.sum(1, keepdim=True)
        matrices.append(matrix)
        graphs.append(dataclasses.replace(toy_graph(i), adjacency=matrix if dense else matrix.to_sparse_csr()))
        offsets.append(offsets[-1] + n)
    operator = gcn_module._BlockAdjacency(graphs, offsets, offsets[-1], torch.device("cpu"))
    block = torch.block_diag(*matrices)
    assert not torch.allclose(block, block.T)
    x = torch.randn(offsets[-1], 3, generator=generator, requires_grad=True)
    weights = torch.randn(offsets[-1], 3, generator=generator)
    ours, = torch.autograd.grad((operator(x) * weights).sum(), x)
    plain, = torch.autograd.grad((block @ x * weights).sum(), x)
    torch.testing.assert_close(operator(x), block @ x)
    torch.testing.assert_close(ours, plain)


def test_gcn_separates_two_clusters():
    graph = toy_graph(0)
    (log_probs,) = train_gcns([graph], FAST, device="cpu")
    assert log_probs.shape == (2, graph.num_nodes)
    torch.testing.assert_close(log_probs.exp().sum(0), torch.ones(graph.num_nodes), atol=1e-5, rtol=0)
    prediction = log_probs.argmax(0)
    half = graph.num_nodes // 2
    assert (prediction[:half] == 0).all() and (prediction[half:] == 1).all()


def test_batched_training_equals_training_each_alone():
    graphs = [toy_graph(1, 10, classes=2, dense=True), toy_graph(2, 14, classes=3),
              toy_graph(3, 7, classes=2)]
    together = train_gcns(graphs, FAST, device="cpu")
    for graph, batched in zip(graphs, together):
        (alone,) = train_gcns([graph], FAST, device="cpu")
        assert batched.shape == (graph.num_classes, graph.num_nodes)
        torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)


def test_training_is_deterministic_and_seeded():
    graph = toy_graph(4)
    first = train_gcns([graph], FAST, device="cpu")[0]
    assert torch.equal(first, train_gcns([graph], FAST, device="cpu")[0])
    other = train_gcns([dataclasses.replace(graph, seed=99)], FAST, device="cpu")[0]
    assert not torch.allclose(first, other)
    assert image_seed(42, "a") == image_seed(42, "a") != image_seed(42, "b") != image_seed(7, "b")


def test_train_gcns_rejects_a_graph_without_labels():
    graph = toy_graph(5)
    graph.labels[:] = IGNORE_INDEX
    with pytest.raises(ValueError, match="toy 5: no labelled node"):
        train_gcns([graph], FAST, device="cpu")


# --------------------------------------------------------------------------------------------- per image


@pytest.fixture(scope="module")
def tiny_image():
    """A tiny synthetic image, blurred-GT CAMs and a randomly initialised IRNet's boundary and features."""
    import cv2

    from data.synthetic import PROFILES, render_sample
    from models.affinity import IRNet
    from models.resnet import create_backbone
    from stages.affinity.train import infer_affinity_input

    sample = render_sample(0, "train", 0, PROFILES["tiny"])
    rgb = sample.image
    height, width = rgb.shape[:2]
    grid = (math.ceil(height / 4), math.ceil(width / 4))
    classes = sorted({o.cls for o in sample.objects})
    high = np.stack([cv2.GaussianBlur((sample.semantic == c + 1).astype(np.float32), (0, 0), 3) for c in classes])
    high /= high.max(axis=(1, 2), keepdims=True)
    low = np.stack([cv2.resize(c, (grid[1], grid[0]), interpolation=cv2.INTER_AREA) for c in high])
    low /= low.max(axis=(1, 2), keepdims=True)
    torch.manual_seed(0)
    model = IRNet(create_backbone("resnet_mini", strides=(1, 2, 1, 1))).eval()
    with torch.no_grad():
        affinity = infer_affinity_input(model, rgb, torch.device("cpu"), boundary_features=True)
    return {"rgb": rgb, "cam": low, "high_res": high, "affinity": affinity, "model": model}


def test_boundary_features_sum_to_the_boundary_logit(tiny_image):
    affinity, model = tiny_image["affinity"], tiny_image["model"]
    assert affinity["boundary_features"].shape == (160, *affinity["boundary"].shape)
    logit = affinity["boundary_features"].sum(0) + model.edge_out.bias.item()
    np.testing.assert_allclose(1 / (1 + np.exp(-logit)), affinity["boundary"], atol=1e-5)


@pytest.mark.parametrize("mode", ["dense", "topk"])
def test_registered_method_runs_end_to_end(tiny_image, mode):
    assert PROPAGATION_METHODS.get("gcn").affinity_method == "irnet"
    cfg = dataclasses.replace(CFG, gcn_adjacency=mode, gcn_topk=32, gcn_walk_steps=16)
    rgb = tiny_image["rgb"]
    size = rgb.shape[:2]
    inputs = {**tiny_image["affinity"], "rgb": rgb, "image_id": np.asarray("tiny_0"), "num_labels": np.asarray(11)}
    run = PROPAGATION_METHODS.get("gcn").run
    probs, index = run(cfg, {"cam": tiny_image["cam"], "high_res": tiny_image["high_res"]},
                       inputs, size, torch.device("cpu"))
    k = tiny_image["cam"].shape[0]
    assert probs.shape == (k + 1, *size) and probs.dtype == np.float32
    assert index.shape == size and index.dtype == np.uint8
    assert np.isfinite(probs).all() and index.max() <= k
    np.testing.assert_array_equal(index, probs.argmax(0))
    assert len(np.unique(index)) > 1, "a trained GCN on a clear CAM finds background and a class"


def test_method_without_image_inputs_names_them(tiny_image):
    with pytest.raises(ValueError, match="boundary_features.*image_id.*rgb"):
        PROPAGATION_METHODS.get("gcn").run(CFG, {"cam": tiny_image["cam"], "high_res": tiny_image["high_res"]},
                                       {"boundary": tiny_image["affinity"]["boundary"]}, (64, 80), "cpu")


def test_one_class_image_and_no_class_image(tiny_image):
    rgb, affinity = tiny_image["rgb"], tiny_image["affinity"]
    cfg = dataclasses.replace(CFG, gcn_walk_steps=8, gcn_epochs=20)
    cam, high = tiny_image["cam"][:1], tiny_image["high_res"][:1]
    probs, index = propagate_gcn(cfg, cam, high, affinity["boundary"], affinity["boundary_features"], rgb,
                                 "one", rgb.shape[:2])
    assert probs.shape == (2, *rgb.shape[:2]) and set(np.unique(index)) <= {0, 1}
    probs, index = propagate_gcn(cfg, cam[:0], high[:0], affinity["boundary"], affinity["boundary_features"], rgb,
                                 "none", rgb.shape[:2])
    assert probs.shape == (1, *rgb.shape[:2]) and not index.any()


def test_empty_partial_labels_fall_back_to_the_cam_label(tiny_image, monkeypatch):
    monkeypatch.setattr(gcn_module, "partial_labels",
                        lambda rgb, cam, cfg: np.full(cam.shape[1:], IGNORE_INDEX, np.uint8))
    rgb, affinity = tiny_image["rgb"], tiny_image["affinity"]
    probs, index = propagate_gcn(CFG, tiny_image["cam"], tiny_image["high_res"], affinity["boundary"],
                                 affinity["boundary_features"], rgb, "empty", rgb.shape[:2])
    expected = np.concatenate([np.full((1, *rgb.shape[:2]), CFG.cam_bg_threshold, np.float32),
                               tiny_image["high_res"]])
    np.testing.assert_array_equal(probs, expected)
    np.testing.assert_array_equal(index, expected.argmax(0))


@pytest.mark.parametrize(("key", "value", "message"), [
    ("gcn_adjacency", "sparse", "Propagate.gcn_adjacency"),
    ("gcn_walk_steps", 0, "Propagate.gcn_walk_steps"),
    ("gcn_dropout", 1.0, "Propagate.gcn_dropout"),
    ("gcn_top_fraction", 0.0, "Propagate.gcn_top_fraction"),
    ("gcn_crf_bilateral", (20.0, 0.0, 10.0), "Propagate.gcn_crf_bilateral"),
])
def test_bad_gcn_knobs_are_rejected_naming_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        validate_propagation(dataclasses.replace(CFG, **{key: value}))


def test_gcn_needs_irnet():
    with pytest.raises(ValueError, match="irnet"):
        validate_propagation(CFG, "affinitynet")


# ---------------------------------------------------------------------------------------------- pipeline


@pytest.mark.slow
def test_full_pipeline_with_gcn_propagation(luigi_config):
    import json

    import luigi
    from conftest import run_luigi

    from pipeline.framework import shard_store
    from pipeline.tasks import EvalPseudoLabels, FullWSSS, PrepareDataset, Propagate
    luigi_config("Propagate", "propagation", "gcn")
    luigi_config("Propagate", "gcn_walk_steps", 16)
    result = run_luigi(FullWSSS())
    assert result.status == luigi.LuigiStatusCode.SUCCESS, result.summary_text
    manifest = json.loads((PrepareDataset().stage_dir / "manifest.json").read_text())
    images = set(manifest["splits"]["train"]) | set(manifest["splits"]["eval"])
    assert {p.stem for p in (Propagate().stage_dir / "labels").glob("*.png")} == images
    some = sorted(images)[0]
    probs = shard_store(Propagate().stage_dir).read(some, ["probs"])[0]["probs"]
    assert probs.shape[0] == 1 + len(manifest["image_labels"][some])
    metrics = json.loads((EvalPseudoLabels().stage_dir / "metrics.json").read_text())
    assert 0 < metrics["chain"]["pseudo_label_miou"] <= 1


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["dense", "topk"])
def test_gcn_adjacency_on_cuda_matches_cpu(mode, cuda_device):
    boundary = random_boundary(9, 11, seed=3)
    cpu = gcn_adjacency(boundary, 10.0, 3, 16, mode, topk=12)
    gpu = gcn_adjacency(boundary.to(cuda_device), 10.0, 3, 16, mode, topk=12)
    assert gpu.device.type == cuda_device.type and gpu.layout == cpu.layout
    dense = (lambda a: a.to_dense()) if mode == "topk" else (lambda a: a)
    torch.testing.assert_close(dense(gpu).cpu(), dense(cpu), atol=1e-6, rtol=1e-4)


@pytest.mark.cuda
def test_gcn_training_on_cuda_batches_like_alone_and_separates_the_clusters(cuda_device):
    graphs = [toy_graph(1, 10, classes=2, dense=True), toy_graph(2, 14, classes=3), toy_graph(3, 7, classes=2)]
    together = train_gcns(graphs, FAST, device=cuda_device)
    for graph, batched in zip(graphs, together):
        (alone,) = train_gcns([graph], FAST, device=cuda_device)
        torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)
    # CUDA draws other initial weights than the CPU (generators differ per device): compare the predictions.
    graph = toy_graph(0)
    (on_device,) = train_gcns([graph], FAST, device=cuda_device)
    (on_cpu,) = train_gcns([graph], FAST, device="cpu")
    assert torch.equal(on_device.argmax(0), on_cpu.argmax(0))
    half = graph.num_nodes // 2
    assert (on_device.argmax(0)[:half] == 0).all() and (on_device.argmax(0)[half:] == 1).all()

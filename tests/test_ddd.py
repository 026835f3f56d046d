"""DDD's grid CRF layer (models/ddd.py) against oracles: brute force over every labeling, a textbook Viterbi,
the per-chain loop of the reference's structure, the dual's bounds and monotonicity, gradcheck, and
alpha-expansion (PyMaxflow) on Potts grids."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from bench.ddd import naive_dual_decomposition
from models.ddd import (
    ChainMarginals,
    DDDLayer,
    DDDOptions,
    GridDecomposition,
    PairwiseHead,
    chain_layout,
    chain_marginals,
    chain_marginals_autograd,
    dual_decomposition,
    grid_score,
    map_inference,
)
from models.segmenters import create_segmenter
from pipeline.checks import validate_config
from pipeline.variants import segmenter_overrides
from stages.config import EvalSegmentationConfig, TrainSegmentationConfig
from stages.segmentation.model import load_matching, load_segmenter
from stages.segmentation.predict import predict_images
from stages.segmentation.train import segmentation_loss, train_segmentation

D64 = torch.float64


def random_chain(n: int, length: int, c: int, seed: int, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(length, n, c, generator=g, dtype=D64),
            scale * torch.randn(length - 1, n, c, c, generator=g, dtype=D64))


def random_grid(b: int, c: int, h: int, w: int, distances: int, seed: int, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    unary = scale * torch.randn(b, c, h, w, generator=g, dtype=D64)
    pairs = [(scale * torch.randn(b, c, c, h, w - d, generator=g, dtype=D64),
              scale * torch.randn(b, c, c, h - d, w, generator=g, dtype=D64)) for d in range(1, distances + 1)]
    return unary, pairs


def chain_scores(unary, pair, labels):
    """S_c(x) of one chain (unary (L, C), pair (L - 1, C, C)) for every labeling in ``labels`` (M, L)."""
    steps = torch.arange(unary.shape[0])
    score = unary[steps, labels].sum(1)
    return score + pair[steps[:-1], labels[:, :-1], labels[:, 1:]].sum(1)


def brute_max_marginals(unary, pair, gamma):
    length, c = unary.shape
    labels = torch.tensor(list(itertools.product(range(c), repeat=length)))
    scores = chain_scores(unary, pair, labels)
    out = torch.empty(length, c, dtype=D64)
    for t, s in itertools.product(range(length), range(c)):
        picked = scores[labels[:, t] == s]
        out[t, s] = picked.max() if gamma == 0 else gamma * torch.logsumexp(picked / gamma, 0)
    return out


def viterbi(unary: np.ndarray, pair: np.ndarray) -> tuple[float, list[int]]:
    """Textbook Viterbi with back-pointers: the best score and path of one chain."""
    score, back = unary[0].copy(), []
    for t in range(1, len(unary)):
        cand = score[:, None] + pair[t - 1]
        back.append(cand.argmax(0))
        score = cand.max(0) + unary[t]
    path = [int(score.argmax())]
    for pointers in reversed(back):
        path.append(int(pointers[path[-1]]))
    return float(score.max()), path[::-1]


def brute_grid_max(unary, pairs):
    """max_x S(x) of each image by enumerating every labeling (C^(H W))."""
    b, c, h, w = unary.shape
    labels = torch.tensor(list(itertools.product(range(c), repeat=h * w))).reshape(-1, h, w)
    best = []
    for i in range(b):
        one = [(hz[i:i + 1].expand(len(labels), -1, -1, -1, -1), vt[i:i + 1].expand(len(labels), -1, -1, -1, -1))
               for hz, vt in pairs]
        best.append(grid_score(labels, unary[i:i + 1].expand(len(labels), -1, -1, -1), one).max())
    return torch.stack(best)


def dual_trace(unary, pairs, gamma, iterations, alpha=0.0):
    grid = GridDecomposition(unary, pairs, gamma)
    alpha = alpha or grid.default_alpha()
    copies, duals = grid.initial_copies(), []
    for _ in range(iterations):
        marginals, dual = grid.marginals(copies)
        duals.append(dual)
        copies = grid.update(copies, marginals, alpha)
    return torch.stack(duals)  # (iterations, B)


# ------------------------------------------------------------------------------------------------- chain DP

@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_chain_marginals_equal_brute_force(gamma):
    unary, pair = random_chain(4, 5, 3, seed=1)
    got = chain_marginals(unary, pair, gamma)
    for n in range(4):
        torch.testing.assert_close(got[:, n], brute_max_marginals(unary[:, n], pair[:, n], gamma), rtol=0, atol=1e-10)


def test_hard_chain_marginals_equal_textbook_viterbi():
    unary, pair = random_chain(64, 9, 5, seed=2)
    m = chain_marginals(unary, pair, 0.0)
    for n in range(64):
        value, path = viterbi(unary[:, n].numpy(), pair[:, n].numpy())
        assert m[:, n].max(1).values.sub(value).abs().max() < 1e-10   # every node's max-marginal max is the MAP
        assert m[:, n].argmax(1).tolist() == path


@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_recompute_function_equals_autograd_values_and_gradients(gamma):
    unary, pair = random_chain(6, 7, 4, seed=3)
    weights = torch.randn(7, 6, 4, dtype=D64)
    grads = []
    for fn in (lambda u, p: ChainMarginals.apply(u, p, gamma), lambda u, p: chain_marginals_autograd(u, p, gamma)):
        u, p = unary.clone().requires_grad_(), pair.clone().requires_grad_()
        out = fn(u, p)
        (out * weights).sum().backward()
        grads.append((out.detach(), u.grad, p.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_single_node_chains_are_their_unary():
    unary = torch.randn(1, 3, 4, dtype=D64)
    torch.testing.assert_close(chain_marginals(unary, torch.zeros(0, 3, 4, 4, dtype=D64), 2.0), unary)


# ---------------------------------------------------------------------------------------------- grid layout

@pytest.mark.parametrize("h,w,k", [(3, 4, 2), (5, 5, 3), (1, 4, 2), (2, 2, 3)])
def test_every_copy_pixel_and_every_edge_lies_in_exactly_one_chain(h, w, k):
    layout = chain_layout(h, w, k)
    slots = torch.cat([g.nodes.reshape(-1) for g in layout.groups])
    edges = torch.cat([g.edges.reshape(-1) for g in layout.groups])
    n_edges = sum(h * max(w - d, 0) + max(h - d, 0) * w for d in range(1, k + 1))
    assert sorted(slots.tolist()) == list(range(2 * k * h * w))
    assert sorted(edges.tolist()) == list(range(n_edges))
    assert len({g.nodes.shape[0] for g in layout.groups}) == len(layout.groups)   # one DP call per length


@pytest.mark.parametrize("gamma", [0.0, 2.0])
@pytest.mark.parametrize("h,w", [(4, 5), (5, 3)])
def test_vectorised_grid_equals_the_per_chain_loop(gamma, h, w):
    unary, pairs = random_grid(2, 3, h, w, 2, seed=4)
    for early_stop in (1e-4, None):
        got = dual_decomposition(unary, pairs, gamma, iterations=6, early_stop=early_stop)
        want = naive_dual_decomposition(unary, pairs, gamma, iterations=6, early_stop=early_stop)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9)


def test_early_stop_is_per_image_and_keeps_the_previous_pass():
    unary, pairs = random_grid(3, 3, 4, 4, 2, seed=5, scale=5.0)
    together = dual_decomposition(unary, pairs, 2.0, iterations=8, alpha=1.0)   # alpha = 1 makes duals rise
    alone = torch.cat([dual_decomposition(unary[i:i + 1], [(a[i:i + 1], b[i:i + 1]) for a, b in pairs], 2.0,
                                          iterations=8, alpha=1.0) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-10)
    duals = dual_trace(unary, pairs, 2.0, 8, alpha=1.0)
    first_rise = [(duals[1:, i] - duals[:-1, i] >= 1e-4).nonzero() for i in range(3)]
    assert any(len(r) for r in first_rise)
    for i, rise in enumerate(first_rise):
        passes = int(rise[0]) + 1 if len(rise) else 8
        kept = dual_decomposition(unary[i:i + 1], [(a[i:i + 1], b[i:i + 1]) for a, b in pairs], 2.0,
                                  iterations=passes, alpha=1.0, early_stop=None)
        torch.testing.assert_close(together[i:i + 1], kept, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------ dual and bounds

@pytest.fixture(scope="module")
def grids_3x3():
    unary, pairs = random_grid(12, 3, 3, 3, 2, seed=6, scale=5.0)
    return unary, pairs, brute_grid_max(unary, pairs)


def test_dual_bounds_the_map_which_bounds_the_decoded_score(grids_3x3):
    unary, pairs, best = grids_3x3
    result = map_inference(unary, pairs, iterations=200)
    assert (result.dual >= best - 1e-9).all()
    assert (best >= result.score - 1e-9).all()
    torch.testing.assert_close(grid_score(result.labels, unary, pairs), result.score)
    # the certificate: where every copy agreed, the decoded labeling attains the bound, so it is the MAP
    assert result.certified.sum() >= 6
    torch.testing.assert_close(result.score[result.certified], best[result.certified], rtol=0, atol=1e-9)
    torch.testing.assert_close(result.dual[result.certified], best[result.certified], rtol=0, atol=1e-9)


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_dual_never_rises_with_the_reference_step_over_200_iterations(grids_3x3, gamma):
    unary, pairs, best = grids_3x3
    duals = dual_trace(unary, pairs, gamma, 200)
    assert (duals[1:] - duals[:-1] <= 1e-9).all()
    assert (duals >= best - 1e-9).all()                       # D_gamma >= D_0 >= max S
    assert (duals[-1] < duals[0] - 1e-3).all()                # and it does descend


def test_the_dual_rises_without_damping():
    unary, pairs = random_grid(30, 3, 4, 4, 1, seed=7, scale=5.0)
    duals = dual_trace(unary, pairs, 0.0, 50, alpha=1.0)
    rose = (duals[1:] - duals[:-1] > 1e-6).any(0)
    assert rose.sum() >= 27, rose.sum()


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_smoothing_gap_bound(gamma):
    unary, pairs = random_grid(6, 4, 4, 5, 2, seed=8)
    smooth, hard = GridDecomposition(unary, pairs, gamma), GridDecomposition(unary, pairs, 0.0)
    copies = smooth.initial_copies()
    nodes = smooth.layout.copies * 4 * 5                       # sum_c n_c: each pixel lies in T chains
    for _ in range(10):
        marginals, d_gamma = smooth.marginals(copies)
        _, d_zero = hard.marginals(copies)
        assert (d_zero <= d_gamma + 1e-9).all()
        assert (d_gamma <= d_zero + gamma * nodes * math.log(4) + 1e-9).all()
        copies = smooth.update(copies, marginals, smooth.default_alpha())


def test_gradcheck_through_three_unrolled_iterations():
    unary, pairs = random_grid(1, 3, 3, 4, 2, seed=9, scale=1.0)
    flat = [unary] + [t for hv in pairs for t in hv]
    flat = [t.clone().requires_grad_() for t in flat]

    def run(u, h1, v1, h2, v2):
        return dual_decomposition(u, [(h1, v1), (h2, v2)], gamma=1.0, iterations=3, early_stop=None)
    assert torch.autograd.gradcheck(run, flat, eps=1e-6, atol=1e-6, fast_mode=True)


# -------------------------------------------------------------------------------------------- MAP vs alpha-expansion

def test_map_mode_matches_alpha_expansion_on_potts_grids():
    maxflow = pytest.importorskip("maxflow")
    b, c, h, w, weight = 5, 4, 20, 20, 1.0
    unary = 2.0 * torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(10), dtype=D64)
    potts = -weight * (1 - torch.eye(c, dtype=D64))            # a score: -1 when labels differ
    pairs = [(potts[None, :, :, None, None].expand(b, c, c, h, w - 1),
              potts[None, :, :, None, None].expand(b, c, c, h - 1, w))]
    result = map_inference(unary, pairs, iterations=300)
    for i in range(b):
        costs = np.ascontiguousarray(-unary[i].permute(1, 2, 0).numpy())
        labels = maxflow.aexpansion_grid(costs, -potts.numpy())
        energy_ae = -float(grid_score(torch.from_numpy(labels.astype(np.int64))[None], unary[i:i + 1],
                                      [(t[i:i + 1], u[i:i + 1]) for t, u in pairs]))
        energy_dd, bound = -float(result.score[i]), -float(result.dual[i])
        assert bound <= energy_ae + 1e-9 and bound <= energy_dd + 1e-9       # -D_0 bounds every energy below
        assert energy_dd <= energy_ae + 0.03 * abs(energy_ae)                # within 3% of alpha-expansion
        assert energy_dd - bound <= 0.03 * abs(bound)                        # and of its own bound


# ------------------------------------------------------------------------------------------------ the layer

def test_pairwise_tables_are_one_conv_on_the_concatenated_features():
    torch.manual_seed(11)
    layer = DDDLayer(5, 3).double()
    torch.nn.init.normal_(layer.pairwise.conv.weight)
    torch.nn.init.normal_(layer.pairwise.conv.bias)
    f = torch.randn(2, 5, 4, 6, dtype=D64)
    _, pairs = layer.potentials(f)
    for d, (horizontal, vertical) in enumerate(pairs, start=1):
        h_pairs = layer.pairwise.conv(torch.cat([f[..., :-d], f[..., d:]], 1)).reshape(2, 3, 3, 4, 6 - d)
        v_pairs = layer.pairwise.conv(torch.cat([f[..., :-d, :], f[..., d:, :]], 1)).reshape(2, 3, 3, 4 - d, 6)
        torch.testing.assert_close(horizontal, h_pairs)
        torch.testing.assert_close(vertical, v_pairs)


def test_layer_forward_backward_any_class_count():
    for classes in (2, 7):
        layer = DDDLayer(4, classes)
        f = torch.randn(2, 4, 5, 6, requires_grad=True)
        out = layer(f)
        assert out.shape == (2, classes, 5, 6)
        out.square().sum().backward()
        assert f.grad.abs().sum() > 0 and layer.pairwise.conv.weight.grad.abs().sum() > 0


def test_bad_input_is_refused_clearly():
    unary, pairs = random_grid(1, 3, 3, 4, 2, seed=12)
    with pytest.raises(ValueError, match="at least 2 classes"):
        DDDLayer(4, 1)
    with pytest.raises(ValueError, match="at least 2 classes"):
        dual_decomposition(unary[:, :1], [(a[:, :1, :1], b[:, :1, :1]) for a, b in pairs])
    with pytest.raises(ValueError, match="distance 2 must be"):
        dual_decomposition(unary, [pairs[0], (pairs[1][0][..., :1], pairs[1][1])])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        dual_decomposition(unary[0], pairs)
    with pytest.raises(ValueError, match="non-empty"):
        dual_decomposition(unary[..., :0], [(a[..., :0], b[..., :0]) for a, b in pairs])
    nan = unary.clone()
    nan[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="unary potentials contain NaN"):
        dual_decomposition(nan, pairs)
    bad = pairs[1][1].clone()
    bad[0, 0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"pairwise \(distance 2\) potentials contain NaN or inf"):
        dual_decomposition(unary, [pairs[0], (pairs[1][0], bad)])
    with pytest.raises(ValueError, match="gamma"):
        dual_decomposition(unary, pairs, gamma=-1.0)


@pytest.mark.cuda
def test_cpu_and_cuda_agree(cuda_device):
    unary, pairs = random_grid(2, 21, 33, 33, 2, seed=13)
    flat = [t.float() for t in [unary] + [x for hv in pairs for x in hv]]
    results = []
    for device in (torch.device("cpu"), cuda_device):
        inputs = [t.detach().clone().to(device).requires_grad_() for t in flat]  # on the CPU .to() is no copy
        out = dual_decomposition(inputs[0], [(inputs[1], inputs[2]), (inputs[3], inputs[4])])
        (out * torch.linspace(-1, 1, out.numel(), device=device).reshape(out.shape)).sum().backward()
        results.append([out.detach().cpu()] + [t.grad.cpu() for t in inputs])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * float(a.abs().max()))


# -------------------------------------------------------------------------------------------- the segmenter

@pytest.mark.parametrize("stride", [8, 16])
def test_deeplabv3_ddd_shapes_strides_and_gradients(stride, one_thread):
    net = create_segmenter("deeplabv3_ddd", "resnet_mini", 5, freeze_bn=False, output_stride=stride,
                           ddd=DDDOptions(iterations=3))
    x = torch.randn(2, 3, 64, 80)
    out = net.train()(x)
    assert out.shape == (2, 5, 64 // stride, 80 // stride)
    segmentation_loss(out, torch.randint(0, 5, (2, 64, 80))).backward()
    for p in (net.pairwise.conv.weight, net.classifier.weight, net.backbone.conv1.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    head = {id(p) for g in net.param_groups() if g["lr_mult"] > 1 for p in g["params"]}
    assert id(net.pairwise.conv.weight) in head
    msc = create_segmenter("deeplabv3_ddd", "resnet_mini", 5, msc=True, output_stride=stride).eval()
    assert msc(x).shape == out.shape


def test_flat_crf_leaves_the_plain_deeplabv3_prediction(tmp_path, one_thread):
    """With zero pairwise tables every chain's marginal is its unary plus a constant, so DDD's softmax is the
    plain DeepLab-v3's, whose weights (classifier included) load by key into the DDD model."""
    torch.manual_seed(0)
    plain = create_segmenter("deeplabv3", "resnet_mini", 4, output_stride=8).eval()
    torch.nn.init.normal_(plain.classifier.weight, 0.0, 0.1)
    torch.save(plain.state_dict(), tmp_path / "v3.pth")
    ddd = create_segmenter("deeplabv3_ddd", "resnet_mini", 4, output_stride=8).eval()
    assert load_matching(ddd, tmp_path / "v3.pth") == ["pairwise.conv.bias", "pairwise.conv.weight"]
    torch.nn.init.zeros_(ddd.pairwise.conv.weight)
    x = torch.randn(1, 3, 56, 72)
    with torch.no_grad():
        torch.testing.assert_close(ddd(x).softmax(1), plain(x).softmax(1), rtol=1e-4, atol=1e-5)
        torch.nn.init.normal_(ddd.pairwise.conv.weight, 0.0, 0.1)
        assert (ddd(x).softmax(1) - plain(x).softmax(1)).abs().max() > 1e-2   # and a learned CRF changes it


def test_segmenter_knobs_are_checked():
    with pytest.raises(ValueError, match="output stride 8 only"):
        create_segmenter("deeplabv2", "resnet_mini", 3, output_stride=16)
    with pytest.raises(ValueError, match="output stride 8 or 16"):
        create_segmenter("deeplabv3_ddd", "resnet_mini", 3, output_stride=32)
    with pytest.raises(ValueError, match="output_stride"):
        validate_config(TrainSegmentationConfig(model="deeplabv3_ddd", output_stride=4, freeze_bn=False))
    with pytest.raises(ValueError, match="ddd_iterations"):
        validate_config(TrainSegmentationConfig(model="deeplabv3_ddd", ddd_iterations=0, freeze_bn=False))


def test_deeplabv3_ddd_trains_end_to_end_and_predicts(tiny_manifest, tmp_path, one_thread):
    cfg = TrainSegmentationConfig(model="deeplabv3_ddd", output_stride=8, iterations=3, batch_size=4, crop_size=48,
                                  scales=(1.0,), freeze_bn=False, eval_every=0, checkpoint_every=3)
    space, manifest = tiny_manifest.label_space, tiny_manifest
    metrics = train_segmentation(cfg, manifest, lambda i, shape: manifest.layout.read_label(i, shape=shape),
                                 tmp_path, torch.device("cpu"))
    assert metrics["iterations"] == 3 and np.isfinite(metrics["final_loss"])
    model = load_segmenter(cfg, space.num_classes, tmp_path, torch.device("cpu"))
    assert isinstance(model.pairwise, PairwiseHead)
    ids = manifest.splits["val"][:2]
    out = predict_images(EvalSegmentationConfig(scales=(1.0,), flip=False, crf=True), model, manifest, ids,
                         tmp_path / "pred", torch.device("cpu"))
    assert np.asarray(out["confusion_raw"]).sum() == np.asarray(out["confusion_crf"]).sum() > 0


def test_compared_segmenter_entries_become_typed_overrides():
    assert segmenter_overrides("deeplabv3_ddd:output_stride=8, ddd_gamma=0.5,msc=true") == {
        "model": "deeplabv3_ddd", "output_stride": 8, "ddd_gamma": 0.5, "msc": True}
    for spec, message in [("magic", "unknown segmentation model"), ("deeplabv3:bogus=1", "'bogus=1'"),
                          ("deeplabv3:output_stride=x", "not a valid int"), ("deeplabv3:scales=1", "scalar")]:
        with pytest.raises((KeyError, ValueError), match=message):
            segmenter_overrides(spec)

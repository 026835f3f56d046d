"""The torch dense-CRF backend (stages.refine.permutohedral, stages.refine.crf) against exact filtering and
pydensecrf."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.synthetic import PROFILES, render_sample
from stages.refine import crf as crf_module
from stages.refine.crf import (
    BACKENDS,
    CRF_PRESETS,
    CRFPreset,
    dense_crf,
    label_crf,
    refine,
    refine_many,
    resolve_backend,
    set_default_backend,
)
from stages.refine.permutohedral import PermutohedralLattice


@pytest.fixture(autouse=True)
def single_thread_and_default_backend():
    """One torch thread (2 shared cores) and the process default backend restored after each test."""
    threads, backend = torch.get_num_threads(), crf_module.default_backend()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    set_default_backend(backend)


def noisy_scene(index: int, n_labels: int = 11, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A demo render (H, W, 3), its GT (255 -> background, classes folded into n_labels) and noisy softmax
    scores (n, H, W) made from it."""
    sample = render_sample(seed, "train", index, PROFILES["demo"])
    gt = np.where(sample.semantic == 255, 0, sample.semantic).astype(np.int64) % n_labels
    rng = np.random.default_rng(100 + index)
    logits = 2.5 * np.eye(n_labels, dtype=np.float32)[gt].transpose(2, 0, 1)
    logits += rng.normal(0.0, 1.5, logits.shape).astype(np.float32)
    scores = np.exp(logits - logits.max(0, keepdims=True))
    return sample.image, gt, (scores / scores.sum(0, keepdims=True)).astype(np.float32)


# --------------------------------------------------------------------------------------------- lattice

@pytest.mark.parametrize("d, bound", [(2, 0.02), (5, 0.04)])
def test_lattice_approximates_exact_gaussian_filter(d, bound):
    # The splat-blur-slice kernel is a piecewise-linear stand-in for the Gaussian (Adams et al. 2010): its
    # total mass is off by a point-dependent factor (about 0.8 in 2-D, 0.5-0.75 in 5-D here), which is why
    # CRFs normalise by filter(1). The normalised response is what matters; for points spaced below one
    # standard deviation (pixels over sxy, colours over srgb) it is within ~1% of the exact one (measured
    # 0.7% in 2-D and 1.3% in 5-D over three seeds), so 2% and 4% leave ~3x headroom.
    g = torch.Generator().manual_seed(d)
    features = torch.rand(300, d, generator=g, dtype=torch.float64) * 2
    values = torch.rand(300, 2, generator=g, dtype=torch.float64) + 0.5
    lattice = PermutohedralLattice(features.float())
    approx = (lattice.filter(values.float()) / lattice.filter(torch.ones(300, 1))).double()
    sq_dist = torch.cdist(features, features) ** 2
    errors = {}
    for sigma in (0.6, 1.0, 1.6):
        kernel = torch.exp(-0.5 * sq_dist / sigma**2)
        exact = kernel @ values / kernel.sum(1, keepdim=True)
        errors[sigma] = float(((approx - exact).abs() / exact).max())
    assert errors[1.0] < bound, errors
    # The lattice's scaling gives unit standard deviation: a narrower or wider Gaussian fits worse.
    assert errors[1.0] < min(errors[0.6], errors[1.6]), errors


def test_lattice_is_linear_and_reusable():
    g = torch.Generator().manual_seed(0)
    lattice = PermutohedralLattice(torch.rand(500, 3, generator=g) * 4)
    a, b = torch.rand(500, 4, generator=g), torch.rand(500, 4, generator=g)
    combined = lattice.filter(2 * a + b)
    assert torch.allclose(combined, 2 * lattice.filter(a) + lattice.filter(b), rtol=1e-5, atol=1e-5)
    assert torch.equal(lattice.filter(a[:, 0]), lattice.filter(a[:, :1])[:, 0])   # (N,) works like (N, 1)
    assert lattice.offsets.shape == (500, 4) and int(lattice.offsets.max()) < lattice.n_vertices
    assert torch.allclose(lattice.weights.sum(1), torch.ones(500), atol=1e-5)      # barycentric
    with pytest.raises(ValueError, match="500 points"):
        lattice.filter(torch.ones(499, 2))
    with pytest.raises(ValueError, match="2-D tensor"):
        PermutohedralLattice(torch.ones(10))


# -------------------------------------------------------------------------------- torch vs pydensecrf

@pytest.mark.parametrize("preset", ["psa_seeds", "deeplab_test"])
def test_torch_marginals_match_pydensecrf(preset):
    worst_diff, agreement = 0.0, []
    for index in (1, 2):
        rgb, _, scores = noisy_scene(index)
        ref = refine(rgb, scores, preset, backend="pydensecrf", marginals=True)
        ours = refine(rgb, scores, preset, backend="torch", device="cpu", marginals=True)
        assert ours.shape == ref.shape and ours.dtype == np.float32
        agreement.append(float((ours.argmax(0) == ref.argmax(0)).mean()))
        worst_diff = max(worst_diff, float(np.abs(ours - ref).max()))
    # Same lattice arithmetic; only float32 summation order differs (measured max diff ~1e-6 to 4e-4).
    assert min(agreement) >= 0.99, agreement
    assert worst_diff < 5e-3, worst_diff


def test_torch_label_crf_matches_pydensecrf():
    rgb, gt, scores = noisy_scene(4)
    noisy_labels = scores.argmax(0)
    assert (noisy_labels != gt).mean() > 0.05          # the CRF has something to clean
    preset = CRF_PRESETS.get("irn_seeds")
    ref = refine(rgb, noisy_labels, "irn_seeds", backend="pydensecrf", n_labels=11)
    ours = refine(rgb, noisy_labels, "irn_seeds", backend="torch", device="cpu", n_labels=11)
    assert ours.dtype == np.int64 and ours.shape == gt.shape
    assert (ours == ref).mean() >= 0.99
    direct = label_crf(rgb, noisy_labels, 11, preset.gt_prob, preset.gaussian, preset.bilateral, backend="torch")
    assert np.array_equal(direct, ours)
    assert (ours == gt).mean() > (noisy_labels == gt).mean()


def test_presets_and_softmax_quirk():
    assert set(CRF_PRESETS.names()) >= {"irn_seeds", "psa_seeds", "wsgcn_partial", "wsgcn_final", "a2gnn_final",
                                        "deeplab_test"}
    assert all(CRF_PRESETS.get(n).iterations == 10 for n in CRF_PRESETS.names())
    rgb, _, scores = noisy_scene(1, n_labels=4)
    rgb, scores = rgb[:48, :64], scores[:, :48, :64]
    final = CRF_PRESETS.get("wsgcn_final")
    expected = np.exp(scores) / np.exp(scores).sum(0)
    quirk = refine(rgb, scores, "wsgcn_final", backend="torch", marginals=True)
    assert np.allclose(quirk, dense_crf(rgb, expected, final.gaussian, final.bilateral, backend="torch"), atol=1e-5)
    # Softmax of probabilities flattens them, so the quirk changes the result.
    plain = dense_crf(rgb, scores, final.gaussian, final.bilateral, backend="torch")
    assert np.abs(quirk - plain).max() > 1e-2
    assert np.array_equal(refine(rgb, scores, "psa_seeds", backend="torch"),
                          refine(rgb, scores, "psa_seeds", backend="torch", marginals=True).argmax(0))
    with pytest.raises(ValueError, match="unary"):
        CRFPreset("logits", (3, 3), (50, 5, 10))
    with pytest.raises(KeyError, match="deeplab_test"):
        refine(rgb, scores, "no_such_preset")


# -------------------------------------------------------------------------------------- backends, pool

def test_bad_backend_names_the_choices():
    rgb = np.zeros((8, 8, 3), np.uint8)
    for call in (lambda: dense_crf(rgb, np.ones((2, 8, 8)), backend="cuda"),
                 lambda: label_crf(rgb, np.zeros((8, 8), np.int64), 2, backend="densecrf"),
                 lambda: refine(rgb, np.ones((2, 8, 8)), "psa_seeds", backend="gpu"),
                 lambda: set_default_backend("fast")):
        with pytest.raises(ValueError, match="pydensecrf, torch, auto"):
            call()
    assert BACKENDS == ("pydensecrf", "torch", "auto")


def test_auto_backend_follows_process_default_and_device():
    set_default_backend("auto")
    assert resolve_backend("auto", device="cpu") == "pydensecrf"
    assert resolve_backend("auto") == ("torch" if torch.cuda.is_available() else "pydensecrf")
    set_default_backend("torch")
    assert resolve_backend("auto", device="cpu") == "torch"
    assert resolve_backend("pydensecrf") == "pydensecrf"
    rgb, _, scores = noisy_scene(2, n_labels=3)
    rgb, scores = rgb[:40, :50], scores[:, :40, :50]
    # With the default set to torch, "auto" gives exactly the torch result.
    assert np.array_equal(dense_crf(rgb, scores), dense_crf(rgb, scores, backend="torch", device="cpu"))


def test_refine_many_pool_equals_inline_in_input_order():
    items = []
    for index in (1, 2, 3):
        rgb, _, scores = noisy_scene(index, n_labels=5)
        items.append((rgb[:40, :56], scores[:, :40, :56]))
    inline = refine_many(items, "psa_seeds", backend="torch", processes=1, device="cpu", marginals=True)
    pooled = refine_many(items, "psa_seeds", backend="torch", processes=2, device="cpu", marginals=True)
    assert len(pooled) == 3
    for one, rgb_scores, two in zip(inline, items, pooled):
        assert np.array_equal(one, two)
        assert np.array_equal(one, refine(*rgb_scores, "psa_seeds", backend="torch", device="cpu", marginals=True))
    assert not np.array_equal(inline[0], inline[1][:, : inline[0].shape[1]])
    labels = refine_many(items[:2], "deeplab_test", backend="pydensecrf", processes=1)
    assert [lab.shape for lab in labels] == [(40, 56), (40, 56)]
    with pytest.raises(ValueError, match="processes"):
        refine_many(items, "psa_seeds", processes=0)


# ---------------------------------------------------------------------------------------------- CUDA

@pytest.mark.cuda
def test_cuda_matches_cpu_torch(cuda_device):
    rgb, _, scores = noisy_scene(1)
    features = torch.rand(2000, 5, generator=torch.Generator().manual_seed(0)) * 3
    on_cpu, on_gpu = PermutohedralLattice(features), PermutohedralLattice(features.to(cuda_device))
    # The lattice is built with the same float32 element-wise operations on both devices.
    assert on_gpu.n_vertices == on_cpu.n_vertices
    assert torch.equal(on_gpu.weights.cpu(), on_cpu.weights)
    for preset in ("psa_seeds", "deeplab_test"):
        cpu = refine(rgb, scores, preset, backend="torch", device="cpu", marginals=True)
        gpu = refine(rgb, scores, preset, backend="torch", device=cuda_device, marginals=True)
        assert float(np.abs(cpu - gpu).max()) < 1e-3
        assert (cpu.argmax(0) == gpu.argmax(0)).mean() >= 0.999
    items = [(rgb, scores), (rgb[:60, :80], scores[:, :60, :80])]
    many = refine_many(items, "psa_seeds", backend="torch", device=cuda_device, processes=2)
    assert [m.shape for m in many] == [rgb.shape[:2], (60, 80)]

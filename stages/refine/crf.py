"""Fully connected CRF (Krähenbühl & Koltun) as IRN, PSA, SEAM, WSGCN, A2GNN and DeepLab use it.

Two front ends build the unary energy; two backends run the same mean-field inference:

- :func:`dense_crf`: unary = -log(scores) with the scores clipped to [1e-5, 1] and **not** renormalised,
  exactly pydensecrf's ``unary_from_softmax``. PSA/SEAM feed it the unnormalised stack
  [(1 - max CAM)^alpha; CAMs], and the missing normalisation is part of their behaviour.
- :func:`label_crf`: IRN's label CRF. The unary of a hard label map puts probability ``gt_prob`` on the
  pixel's label and (1 - gt_prob) / (n - 1) on each other label (``unary_from_labels`` with
  ``zero_unsure=False``: label 0 is an ordinary class); the result is the argmax of the marginals.

Both use a position-only Gaussian kernel (sxy, compat) plus a bilateral kernel (sxy, srgb, compat) on the
uint8 RGB image, Potts compatibilities and symmetric normalisation. Backends (``backend=``):

- ``pydensecrf``: the reference C++ code, single-threaded CPU (:func:`_pydensecrf_marginals` is the only
  place it is called);
- ``torch``: :func:`_torch_marginals`, the same mean field on :class:`stages.refine.permutohedral.PermutohedralLattice`,
  on any device (``device=``); it reproduces pydensecrf's lattice arithmetic, so marginals agree to ~1e-5;
- ``auto``: the process default from :func:`set_default_backend` (``[wsss] crf_backend``); left at ``auto``
  it is ``torch`` when the target device is CUDA (``device=`` or, when not given, CUDA being available) and
  ``pydensecrf`` otherwise.

:data:`CRF_PRESETS` names every reference call site's parameters; :func:`refine` applies one to an image,
:func:`refine_many` to many (a process pool on CPU, one image after another on a GPU).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from models.registry import Registry

# pydensecrf's unary_from_softmax clips probabilities to [1e-5, 1] before the log; so do we.
SCORE_CLIP = 1e-5


def _check_image(rgb: np.ndarray, size: tuple[int, int] | None = None) -> None:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8:
        dtype = getattr(rgb, "dtype", type(rgb).__name__)
        raise ValueError(f"CRF image must be a uint8 RGB array, got dtype {dtype}")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"CRF image must have shape (H, W, 3), got {rgb.shape}")
    if size is not None and rgb.shape[:2] != size:
        raise ValueError(f"CRF image size {rgb.shape[:2]} differs from the score/label size {size}")


def _check_kernels(gaussian: tuple[float, float], bilateral: tuple[float, float, float], iterations: int) -> None:
    if len(gaussian) != 2:
        raise ValueError(f"CRF gaussian kernel must be (sxy, compat), got {gaussian}")
    if len(bilateral) != 3:
        raise ValueError(f"CRF bilateral kernel must be (sxy, srgb, compat), got {bilateral}")
    if gaussian[0] <= 0 or bilateral[0] <= 0 or bilateral[1] <= 0:
        raise ValueError(f"CRF kernel widths must be positive: gaussian={gaussian}, bilateral={bilateral}")
    if iterations < 1:
        raise ValueError(f"CRF iterations must be at least 1, got {iterations}")


BACKENDS = ("pydensecrf", "torch", "auto")
_default_backend = "auto"


def _check_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown CRF backend {name!r}; choose one of {', '.join(BACKENDS)}")


def set_default_backend(name: str) -> None:
    """The backend that ``backend="auto"`` means in this process (``[wsss] crf_backend``)."""
    global _default_backend
    _check_backend(name)
    _default_backend = name


def default_backend() -> str:
    return _default_backend


def _torch_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_backend(backend: str = "auto", device: str | torch.device | None = None) -> str:
    """The concrete backend ("pydensecrf" or "torch") that ``backend`` means for a run on ``device``."""
    _check_backend(backend)
    if backend == "auto":
        backend = _default_backend
    if backend == "auto":
        backend = "torch" if _torch_device(device).type == "cuda" else "pydensecrf"
    return backend


def _pydensecrf_marginals(rgb: np.ndarray, unary: np.ndarray, gaussian: tuple[float, float],
                          bilateral: tuple[float, float, float], iterations: int) -> np.ndarray:
    """Mean-field marginals (n, H, W) float32 for a unary energy (n, H*W) with pydensecrf."""
    import pydensecrf.densecrf as dcrf

    n = unary.shape[0]
    h, w = rgb.shape[:2]
    crf = dcrf.DenseCRF2D(w, h, n)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=float(gaussian[0]), compat=float(gaussian[1]))
    crf.addPairwiseBilateral(sxy=float(bilateral[0]), srgb=float(bilateral[1]),
                             rgbim=np.array(rgb, dtype=np.uint8, order="C"), compat=float(bilateral[2]))
    # (a copy: pydensecrf wants a writable buffer, and decoded images are read-only views)
    q = crf.inference(int(iterations))
    return np.asarray(q, dtype=np.float32).reshape(n, h, w)


def _torch_marginals(rgb: np.ndarray, unary: np.ndarray, gaussian: tuple[float, float],
                     bilateral: tuple[float, float, float], iterations: int,
                     device: str | torch.device | None = None) -> np.ndarray:
    """pydensecrf's mean field (Potts, symmetric normalisation) in float32 torch; marginals (n, H, W)."""
    from stages.refine.permutohedral import PermutohedralLattice

    dev = _torch_device(device)
    n = unary.shape[0]
    h, w = rgb.shape[:2]
    with torch.no_grad():
        # pydensecrf's features: (column, row) / sxy and the uint8 channels / srgb, divided in float32.
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=dev),
                                torch.arange(w, dtype=torch.float32, device=dev), indexing="ij")
        position = torch.stack([xs.reshape(-1), ys.reshape(-1)], 1)
        colour = torch.from_numpy(np.ascontiguousarray(rgb).reshape(-1, 3)).to(dev).to(torch.float32)
        kernels = []
        for features, compat in ((position / torch.tensor(float(gaussian[0]), device=dev), gaussian[1]),
                                 (torch.cat([position / torch.tensor(float(bilateral[0]), device=dev),
                                             colour / torch.tensor(float(bilateral[1]), device=dev)], 1),
                                  bilateral[2])):
            lattice = PermutohedralLattice(features)
            norm = torch.rsqrt(lattice.filter(torch.ones(h * w, 1, device=dev)) + 1e-20)
            kernels.append((lattice, norm, float(compat)))
        energy_unary = torch.from_numpy(np.ascontiguousarray(unary.T, dtype=np.float32)).to(dev)   # (H*W, n)
        q = torch.softmax(-energy_unary, 1)
        for _ in range(int(iterations)):
            energy = -energy_unary
            for lattice, norm, compat in kernels:
                # Potts: the message is -compat * k(Q), subtracted from the energy; k(Q) = n filter(n Q).
                energy.addcmul_(lattice.filter(q * norm), norm, value=compat)
            q = torch.softmax(energy, 1)
        return q.T.reshape(n, h, w).cpu().numpy()


def _marginals(rgb: np.ndarray, unary: np.ndarray, gaussian: tuple[float, float],
               bilateral: tuple[float, float, float], iterations: int, backend: str,
               device: str | torch.device | None) -> np.ndarray:
    if resolve_backend(backend, device) == "torch":
        return _torch_marginals(rgb, unary, gaussian, bilateral, iterations, device)
    return _pydensecrf_marginals(rgb, unary, gaussian, bilateral, iterations)


def dense_crf(rgb: np.ndarray, scores: np.ndarray, gaussian: tuple[float, float] = (3.0, 3.0),
              bilateral: tuple[float, float, float] = (80.0, 13.0, 10.0), iterations: int = 10, *,
              backend: str = "auto", device: str | torch.device | None = None) -> np.ndarray:
    """CRF marginals (n, H, W) float32 for per-label scores (n, H, W), used as -log(clip(scores, 1e-5, 1))."""
    _check_backend(backend)
    scores = np.asarray(scores)
    if scores.ndim != 3:
        raise ValueError(f"CRF scores must have shape (n, H, W), got {scores.shape}")
    n = scores.shape[0]
    if n < 1:
        raise ValueError("CRF needs at least one label (scores has 0 channels)")
    _check_image(rgb, scores.shape[1:])
    _check_kernels(gaussian, bilateral, iterations)
    if n == 1:  # a single label takes all the mass
        return np.ones(scores.shape, np.float32)
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    # The log runs in the scores' own precision, as in unary_from_softmax, so both give identical energies.
    unary = (-np.log(np.clip(scores, SCORE_CLIP, 1.0))).astype(np.float32).reshape(n, -1)
    return _marginals(rgb, unary, gaussian, bilateral, iterations, backend, device)


def label_unary(labels: np.ndarray, n_labels: int, gt_prob: float) -> np.ndarray:
    """Energy (n, H*W) float32: -log(gt_prob) at the pixel's label, -log((1 - gt_prob) / (n - 1)) elsewhere."""
    flat = labels.reshape(-1).astype(np.int64)
    unary = np.full((n_labels, flat.size), -np.log((1.0 - gt_prob) / (n_labels - 1)), np.float32)
    unary[flat, np.arange(flat.size)] = -np.log(gt_prob)
    return unary


def label_crf(rgb: np.ndarray, labels: np.ndarray, n_labels: int, gt_prob: float = 0.7,
              gaussian: tuple[float, float] = (3.0, 3.0),
              bilateral: tuple[float, float, float] = (50.0, 5.0, 10.0), iterations: int = 10, *,
              backend: str = "auto", device: str | torch.device | None = None) -> np.ndarray:
    """IRN's label CRF: refine a hard label map (H, W) with values in [0, n_labels); returns int64 (H, W)."""
    _check_backend(backend)
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"CRF label map must have shape (H, W), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"CRF label map must be integer, got dtype {labels.dtype}")
    if n_labels < 1:
        raise ValueError(f"CRF needs at least one label, got n_labels={n_labels}")
    if not 0 < gt_prob < 1:
        raise ValueError(f"CRF gt_prob must be in (0, 1), got {gt_prob}")
    _check_image(rgb, labels.shape)
    _check_kernels(gaussian, bilateral, iterations)
    if labels.size and (labels.min() < 0 or labels.max() >= n_labels):
        raise ValueError(f"CRF labels must lie in [0, {n_labels}), got range [{labels.min()}, {labels.max()}]")
    if n_labels == 1:
        return np.zeros(labels.shape, np.int64)
    unary = label_unary(labels, n_labels, gt_prob)
    return _marginals(rgb, unary, gaussian, bilateral, iterations, backend, device).argmax(0)


# ------------------------------------------------------------------------------------------- presets

@dataclass(frozen=True)
class CRFPreset:
    """One reference call site's CRF: how the unary is made and the kernel parameters.

    ``unary``: ``scores`` (-log of clipped scores, :func:`dense_crf`) or ``labels`` (a hard label map with
    ``gt_prob``, :func:`label_crf`). ``softmax_scores``: take a softmax over the label axis of the scores
    first (WSGCN's CRF.py does this to probabilities, which flattens them). ``stride``: the resolution, as
    an output stride, at which the reference runs it; the caller passes image and scores at that size.
    """

    unary: str
    gaussian: tuple[float, float]                 # sxy, compat
    bilateral: tuple[float, float, float]         # sxy, srgb, compat
    iterations: int = 10
    gt_prob: float = 0.7
    softmax_scores: bool = False
    stride: int = 1

    def __post_init__(self) -> None:
        if self.unary not in ("scores", "labels"):
            raise ValueError(f"CRFPreset.unary must be 'scores' or 'labels', got {self.unary!r}")
        _check_kernels(self.gaussian, self.bilateral, self.iterations)
        if not 0 < self.gt_prob < 1:
            raise ValueError(f"CRFPreset.gt_prob must be in (0, 1), got {self.gt_prob}")


CRF_PRESETS: Registry[CRFPreset] = Registry("CRF preset")
for _name, _preset in {
    # IRN misc/imutils.crf_inference_label (cam_to_ir_label): labels, gt_prob 0.7, zero_unsure=False.
    "irn_seeds": CRFPreset("labels", (3.0, 3.0), (50.0, 5.0, 10.0), gt_prob=0.7),
    # PSA tool/imutils.crf_inference (infer_cls.py la/ha seeds) on the unnormalised [(1-max)^a; CAMs].
    "psa_seeds": CRFPreset("scores", (3.0, 3.0), (80.0, 13.0, 10.0)),
    # WSGCN utils.crf_inference (make_dataset partial labels), run on CAMs and image at stride 4.
    "wsgcn_partial": CRFPreset("scores", (4.0, 3.0), (20.0, 3.0, 10.0), stride=4),
    # WSGCN CRF.py: softmax over the GCN's probabilities again, then unary_from_softmax; bilateral compat 3.
    "wsgcn_final": CRFPreset("scores", (3.0, 3.0), (50.0, 5.0, 3.0), softmax_scores=True),
    # A2GNN mytool.crf_inference_inf: final pseudo labels from softmax(GNN) (or GNN + 3 RW, renormalised).
    "a2gnn_final": CRFPreset("scores", (2.0, 3.0), (50.0, 5.0, 10.0)),
    # DGCN evaluate.py (hustvl): softmax of the summed multi-scale logits, then this CRF at full resolution.
    "dgcn_test": CRFPreset("scores", (3.0, 3.0), (80.0, 13.0, 10.0)),
    # deeplab-pytorch libs/utils/crf.py with configs/voc12.yaml's CRF section (main.py crf): test time.
    "deeplab_test": CRFPreset("scores", (1.0, 3.0), (67.0, 3.0, 4.0)),
}.items():
    CRF_PRESETS.register(_name)(_preset)


def _preset(preset: str | CRFPreset) -> CRFPreset:
    return preset if isinstance(preset, CRFPreset) else CRF_PRESETS.get(preset)


def refine(rgb: np.ndarray, scores_or_labels: np.ndarray, preset: str | CRFPreset, backend: str = "auto",
           device: str | torch.device | None = None, *, n_labels: int | None = None,
           marginals: bool = False) -> np.ndarray:
    """Apply a preset (a name in :data:`CRF_PRESETS` or a :class:`CRFPreset`) to one image.

    Scores presets take per-label scores (n, H, W); labels presets a label map (H, W) with values in
    [0, n_labels) (``n_labels`` defaults to its maximum + 1). Returns the refined label map (H, W) int64, or
    with ``marginals=True`` (scores presets only) the marginals (n, H, W) float32.
    """
    p = _preset(preset)
    if p.unary == "labels":
        if marginals:
            raise ValueError("a labels preset returns labels only (marginals=True needs a scores preset)")
        labels = np.asarray(scores_or_labels)
        if n_labels is None:
            n_labels = int(labels.max()) + 1 if labels.size else 1
        return label_crf(rgb, labels, n_labels, p.gt_prob, p.gaussian, p.bilateral, p.iterations,
                         backend=backend, device=device)
    scores = np.asarray(scores_or_labels)
    if p.softmax_scores:
        if scores.ndim != 3:
            raise ValueError(f"CRF scores must have shape (n, H, W), got {scores.shape}")
        shifted = np.exp(scores - scores.max(0, keepdims=True))
        scores = shifted / shifted.sum(0, keepdims=True)
    out = dense_crf(rgb, scores, p.gaussian, p.bilateral, p.iterations, backend=backend, device=device)
    return out if marginals else out.argmax(0)


def _refine_item(args: tuple) -> np.ndarray:
    rgb, array, preset, backend, device, n_labels, marginals = args
    return refine(rgb, array, preset, backend, device, n_labels=n_labels, marginals=marginals)


def _single_thread_worker() -> None:
    torch.set_num_threads(1)


def refine_many(items: Sequence[tuple[np.ndarray, np.ndarray]], preset: str | CRFPreset, backend: str = "auto",
                processes: int | None = None, device: str | torch.device | None = None, *,
                n_labels: int | None = None, marginals: bool = False) -> list[np.ndarray]:
    """:func:`refine` over (rgb, scores_or_labels) pairs; results in input order.

    CPU work (pydensecrf, or torch on the CPU) runs in a pool of ``processes`` spawned workers with one
    thread each (default: one per available core; 1 runs inline); torch on a GPU runs the images one after
    another in this process. Each image is computed independently, so results do not depend on
    ``processes``.
    """
    p = _preset(preset)
    concrete = resolve_backend(backend, device)      # resolved here: spawned workers have their own default
    dev = _torch_device(device) if concrete == "torch" else None
    jobs = [(rgb, array, p, concrete, dev, n_labels, marginals) for rgb, array in items]
    if processes is None:
        processes = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if processes < 1:
        raise ValueError(f"refine_many needs processes >= 1, got {processes}")
    processes = min(processes, len(jobs))
    if processes <= 1 or (dev is not None and dev.type != "cpu"):
        return [_refine_item(job) for job in jobs]
    with multiprocessing.get_context("spawn").Pool(processes, initializer=_single_thread_worker) as pool:
        return pool.map(_refine_item, jobs, chunksize=1)

"""Fully connected CRF (Krähenbühl & Koltun) as IRN, PSA, SEAM and A2GNN use it.

Two front ends build the unary energy; one backend runs mean-field inference:

- :func:`dense_crf`: unary = -log(scores) with the scores clipped to [1e-5, 1] and **not** renormalised,
  exactly pydensecrf's ``unary_from_softmax``. PSA/SEAM feed it the unnormalised stack
  [(1 - max CAM)^alpha; CAMs], and the missing normalisation is part of their behaviour.
- :func:`label_crf`: IRN's label CRF. The unary of a hard label map puts probability ``gt_prob`` on the
  pixel's label and (1 - gt_prob) / (n - 1) on each other label (``unary_from_labels`` with
  ``zero_unsure=False``: label 0 is an ordinary class); the result is the argmax of the marginals.

Both use a position-only Gaussian kernel (sxy, compat) plus a bilateral kernel (sxy, srgb, compat) on the
uint8 RGB image. The backend is :func:`_pydensecrf_marginals`; it is the only place pydensecrf is called.
"""

from __future__ import annotations

import numpy as np

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


def dense_crf(rgb: np.ndarray, scores: np.ndarray, gaussian: tuple[float, float] = (3.0, 3.0),
              bilateral: tuple[float, float, float] = (80.0, 13.0, 10.0), iterations: int = 10) -> np.ndarray:
    """CRF marginals (n, H, W) float32 for per-label scores (n, H, W), used as -log(clip(scores, 1e-5, 1))."""
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
    return _pydensecrf_marginals(rgb, unary, gaussian, bilateral, iterations)


def label_unary(labels: np.ndarray, n_labels: int, gt_prob: float) -> np.ndarray:
    """Energy (n, H*W) float32: -log(gt_prob) at the pixel's label, -log((1 - gt_prob) / (n - 1)) elsewhere."""
    flat = labels.reshape(-1).astype(np.int64)
    unary = np.full((n_labels, flat.size), -np.log((1.0 - gt_prob) / (n_labels - 1)), np.float32)
    unary[flat, np.arange(flat.size)] = -np.log(gt_prob)
    return unary


def label_crf(rgb: np.ndarray, labels: np.ndarray, n_labels: int, gt_prob: float = 0.7,
              gaussian: tuple[float, float] = (3.0, 3.0),
              bilateral: tuple[float, float, float] = (50.0, 5.0, 10.0), iterations: int = 10) -> np.ndarray:
    """IRN's label CRF: refine a hard label map (H, W) with values in [0, n_labels); returns int64 (H, W)."""
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
    marginals = _pydensecrf_marginals(rgb, label_unary(labels, n_labels, gt_prob), gaussian, bilateral, iterations)
    return marginals.argmax(0)

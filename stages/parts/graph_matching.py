"""GMNet's graph-matching loss on part adjacency, as one Gram product.

The reference (LTTM/GMNet ``utils/train_utils.py``, spec ``gmnet_ddd_spec.md`` A.3) compares the part
adjacency of the prediction P = argmax(logits) with that of the label map G:

1. K = sorted classes present in P or G over the **whole batch** (255 counted as 0); K' = K[1:], so the
   smallest present id (normally background) takes no part.
2. M_k(Y) = 1[Y = k] (255 never matches); D_k = M_k dilated by a flat ``dilation`` x ``dilation`` max filter
   with TF "SAME" padding (for 2: pad 0 before, 1 after, so a mask grows one pixel up and left).
3. A[k, l] = sum over batch and pixels of D_k * D_l for k < l in K'; zero elsewhere (strictly upper
   triangular, one graph per batch).
4. Each column of A is L2-normalised: A[:, l] / sqrt(max(sum_k A[k, l]^2, 1e-12)) (``tf.nn.l2_normalize``).
5. L = ||Â(P) - Â(G)||_F^2 / C, C the number of classes.

The reference loops over every pair of present classes and dilates both masks per pair: O(|K|^2) dilations
of the full batch. Here the C masks are dilated once, flattened to a (C, N) matrix D with N = B*H*W, and
A = D D^T restricted to the K' upper triangle: one matmul, O(N*C^2) multiply-adds and O(N*C) memory, the same
counts exactly (tests/test_gmnet.py compares it with a pixel loop of the rules above). For a label map (the
label side, and the argmax prediction of ``hard`` and ``st``) the dilated masks need no max filter: a pixel's
dilated row is 1 exactly at the labels of its ``dilation`` x ``dilation`` window, so D is one scatter of the
d^2 shifted maps into zeros, O(N*d^2) writes instead of a max filter over all C channels (4x faster at 513^2).

Gradient. The released loss is built from argmax, equality and counts, so it has none: in the reference it
adds a constant and never changes the weights (``mode = "hard"`` reproduces that and a test proves that
training with it gives the weights of training without it). ``soft`` replaces M_k(P) by the softmax S_k
(same K', dilation, pooling, normalisation). ``st`` (straight-through) keeps the released value and takes the
gradient of the soft one: L = L_soft + stopgrad(L_hard - L_soft). The straight-through is on the loss, not on the
masks: D_hard + (D_soft - stopgrad(D_soft)) has the same value but evaluates the column normalisation's Jacobian
at the hard Gram, which is 1e6 x I (the 1e-12 floor) on a column the prediction leaves empty, i.e. whenever
the prediction misses a part's every GT adjacency; there the gradient reached 1e4 per logit on a 16 x 16 toy
and GMNet training at gm_lambda = 10 turned non-finite within 4 iterations (tests/test_gmnet.py holds both).

``valid = "same"`` counts the prediction only where the label is not 255, so P and G are compared on one set
of pixels (the synthetic data's 255 bands separate objects; predictions have none); ``"pred_all"`` is the
reference, which counts the prediction everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = 255
GM_MODES = ("off", "hard", "soft", "st")
GM_VALID = ("same", "pred_all")


def dilate(masks: Tensor, size: int) -> Tensor:
    """Flat ``size`` x ``size`` max filter over the last two dims with TF "SAME" padding (zeros; masks >= 0)."""
    if size <= 1:
        return masks
    before = (size - 1) // 2
    after = size - 1 - before
    padded = F.pad(masks, (before, after, before, after))
    return F.max_pool2d(padded, size, stride=1)


def present_classes(pred: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Bool (C,): the classes of K' = K[1:], K the sorted union of P's and G's values with 255 read as 0."""
    present = torch.zeros(num_classes, dtype=torch.bool, device=labels.device)
    for y in (pred, labels):
        values = torch.where(y == IGNORE, torch.zeros_like(y), y).unique()
        present[values] = True
    present[present.nonzero()[:1, 0]] = False  # drop the smallest present id
    return present


def dilated_label_masks(y: Tensor, num_classes: int, size: int, dtype: torch.dtype) -> Tensor:
    """The masks 1[y = k] of a label map (B, H, W) with 255 holes, dilated as :func:`dilate` does, flattened to
    (B*H*W, C): row p is 1 at every label in p's window (the window padded with holes, which match nothing)."""
    before = (size - 1) // 2
    after = size - 1 - before
    hole = num_classes                  # one spare column catches holes and padding, then is dropped
    padded = F.pad(torch.where(y == IGNORE, torch.full_like(y, hole), y), (before, after, before, after), value=hole)
    height, width = y.shape[-2:]
    window = torch.stack([padded[:, i:i + height, j:j + width] for i in range(size) for j in range(size)], -1)
    masks = torch.zeros(*y.shape, num_classes + 1, dtype=dtype, device=y.device).scatter_(-1, window, 1.0)
    return masks[..., :num_classes].reshape(-1, num_classes)


def gram(dilated: Tensor) -> Tensor:
    """D D^T over batch and pixels: (B, C, H, W) -> (C, C) overlap counts of every pair of dilated masks."""
    flat = dilated.transpose(0, 1).reshape(dilated.shape[1], -1)
    return flat @ flat.T


def restrict(counts: Tensor, present: Tensor) -> Tensor:
    """Counts kept on the strictly upper triangle of K' x K' (``present`` marks K')."""
    keep = torch.triu(present[:, None] & present[None, :], diagonal=1)
    return counts * keep.to(counts.dtype)


def adjacency(dilated: Tensor, present: Tensor) -> Tensor:
    """A = D D^T restricted to the strictly upper triangle of K' x K'. (B, C, H, W) -> (C, C)."""
    return restrict(gram(dilated), present)


def map_gram(y: Tensor, num_classes: int, dilation: int = 2, dtype: torch.dtype = torch.float64) -> Tensor:
    """Unrestricted Gram of one label map batch (B, H, W); Grams of image sets add up, so a dataset-level graph
    is the sum of per-image Grams restricted once with the set's K' (EvalParts)."""
    masks = dilated_label_masks(y, num_classes, dilation, dtype)
    return masks.T @ masks


def normalise_columns(adj: Tensor) -> Tensor:
    """Each column over its L2 norm, the norm floored at 1. A hard Gram holds pixel counts, so its non-empty
    columns have norm >= 1 and this is tf.nn.l2_normalize's value exactly (its 1e-12 floor only meets an
    all-zero column, which is zero either way). A soft Gram's column of a part the prediction nearly misses
    can have any small norm, and 1 / norm then multiplies its gradient without bound: at gm_lambda = 10 the
    demo's part training turned non-finite at iteration 257 with the 1e-12 floor."""
    return adj * torch.rsqrt((adj * adj).sum(0, keepdim=True).clamp_min(1.0))


def matching_loss(adj_pred: Tensor, adj_label: Tensor) -> Tensor:
    """||Â(P) - Â(G)||_F^2 / C (the reference's ``mean_squared_error`` on weighted graphs)."""
    diff = normalise_columns(adj_pred) - normalise_columns(adj_label)
    return (diff * diff).sum() / adj_pred.shape[0]


def graph_matching_maps(pred: Tensor, labels: Tensor, num_classes: int, dilation: int = 2,
                        valid: str = "same", dtype: torch.dtype = torch.float32) -> Tensor:
    """The released loss from two label maps (B, H, W) (the prediction has no 255 unless ``valid = same``
    puts the label's holes into it); no gradient. EvalParts's adjacency error is this on val."""
    if valid not in GM_VALID:
        raise ValueError(f"gm_valid must be one of {GM_VALID}, got {valid!r}")
    if valid == "same":
        pred = torch.where(labels == IGNORE, torch.full_like(pred, IGNORE), pred)
    present = present_classes(pred, labels, num_classes)
    adj_p, adj_g = (restrict(map_gram(y, num_classes, dilation, dtype), present) for y in (pred, labels))
    return matching_loss(adj_p, adj_g)


def graph_matching_loss(logits: Tensor, labels: Tensor, mode: str = "st", dilation: int = 2,
                        valid: str = "same", temperature: float = 1.0) -> Tensor:
    """GMNet's graph-matching loss of part logits (B, C, H, W) against labels (B, H, W) at the same size.

    ``mode``: ``off`` (0), ``hard`` (the released value, no gradient), ``soft`` (softmax masks), ``st``
    (released value, soft gradient). λ is applied by the caller.
    """
    if mode not in GM_MODES:
        raise ValueError(f"gm_mode must be one of {GM_MODES}, got {mode!r}")
    if valid not in GM_VALID:
        raise ValueError(f"gm_valid must be one of {GM_VALID}, got {valid!r}")
    if logits.shape[-2:] != labels.shape[-2:] or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ in size")
    if mode == "off":
        return logits.new_zeros(())
    num_classes = logits.shape[1]
    pred = logits.detach().argmax(1)
    if mode == "hard":
        return graph_matching_maps(pred, labels, num_classes, dilation, valid, logits.dtype)
    mask = (labels != IGNORE).to(logits.dtype)[:, None] if valid == "same" else 1.0
    if valid == "same":
        pred = torch.where(labels == IGNORE, torch.full_like(pred, IGNORE), pred)
    present = present_classes(pred, labels, num_classes)
    with torch.no_grad():
        adj_g = restrict(map_gram(labels, num_classes, dilation, logits.dtype), present)
    soft = matching_loss(adjacency(dilate((logits / temperature).softmax(1) * mask, dilation), present), adj_g)
    if mode == "soft":
        return soft
    with torch.no_grad():
        hard = matching_loss(restrict(map_gram(pred, num_classes, dilation, logits.dtype), present), adj_g)
    return soft + (hard - soft.detach())

"""DDD's grid CRF layer (``python -m bench.ddd``): the vectorised chain DP against a per-chain Python loop.

The baseline, :func:`naive_dual_decomposition`, is the reference's structure written plainly: for every image,
every distance d, every phase grid x[i::d, j::d] and every row and column of it, one chain DP call, the marginals
scattered back pixel by pixel (the same outputs as :func:`models.ddd.dual_decomposition`, checked here and in
tests/test_ddd.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.ddd import GridPairs, chain_marginals, smax


def _naive_pass(unary: Tensor, pairs: GridPairs, copies: list[Tensor], gamma: float
                ) -> tuple[list[Tensor], float]:
    """One image: every copy's max-marginals (C, H, W) chain by chain, and the dual."""
    _, h, w = unary.shape
    marginals, dual = [], 0.0
    for t, u in enumerate(copies):
        d, vertical = t // 2 + 1, t % 2 == 1
        table = pairs[d - 1][1 if vertical else 0]
        m = torch.zeros_like(u)
        for i in range(min(d, h)):           # phase grid x[i::d, j::d]
            for j in range(min(d, w)):
                lines = range(len(range(j, w, d))) if vertical else range(len(range(i, h, d)))
                for k in lines:              # its columns (vertical) or rows (horizontal)
                    if vertical:
                        x = j + d * k
                        ys = slice(i, h, d)
                        cu, cp = u[:, ys, x], table[:, :, i::d, x]
                        cp = cp[:, :, :cu.shape[1] - 1]
                    else:
                        y = i + d * k
                        xs = slice(j, w, d)
                        cu, cp = u[:, y, xs], table[:, :, y, j::d]
                        cp = cp[:, :, :cu.shape[1] - 1]
                    cm = chain_marginals(cu.T[:, None], cp.permute(2, 0, 1)[:, None], gamma)[:, 0].T
                    if vertical:
                        m[:, ys, x] = cm
                    else:
                        m[:, y, xs] = cm
                    dual += float(smax(cm[:, 0], gamma, 0))
        marginals.append(m)
    return marginals, dual


def _naive_image(unary: Tensor, pairs: GridPairs, gamma: float, iterations: int, alpha: float,
                 early_stop: float | None) -> Tensor:
    copies_count = 2 * len(pairs)
    copies = [unary / copies_count for _ in range(copies_count)]
    alpha = alpha or 1.0 / max(unary.shape[1:])
    marginals, dual = _naive_pass(unary, pairs, copies, gamma)
    output = sum(marginals)
    for _ in range(iterations - 1):
        mean = sum(marginals) / copies_count
        copies = [u - alpha * (m - mean) for u, m in zip(copies, marginals)]
        marginals, new_dual = _naive_pass(unary, pairs, copies, gamma)
        if early_stop is not None and new_dual - dual >= early_stop:
            break
        output, dual = sum(marginals), new_dual
    return output


def naive_dual_decomposition(unary: Tensor, pairs: GridPairs, gamma: float = 2.0, iterations: int = 5,
                             alpha: float = 0.0, early_stop: float | None = 1e-4) -> Tensor:
    """:func:`models.ddd.dual_decomposition` with a Python loop over images, copies, phase grids and chains."""
    return torch.stack([_naive_image(unary[b], [(hz[b], vt[b]) for hz, vt in pairs], gamma, iterations, alpha,
                                     early_stop) for b in range(unary.shape[0])])

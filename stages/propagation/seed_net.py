"""Pseudo labels predicted by a net that TrainSeedNet trained from regrowing seeds (DGCN's graph cut, DSRG):
the method's work happened in training; here its multi-scale class probabilities are the scores."""

from __future__ import annotations

import numpy as np
import torch

from stages.config import PropagateConfig


def predicted_scores(cfg: PropagateConfig, cams: dict[str, np.ndarray], inputs: dict[str, np.ndarray],
                     size: tuple[int, int], device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    probs = inputs["probs"]
    if probs.shape[1:] != tuple(size) or probs.shape[0] != cams["high_res"].shape[0] + 1:
        raise ValueError(f"seed net probabilities {probs.shape} do not match the image's background + "
                         f"{cams['high_res'].shape[0]} classes at {tuple(size)}")
    return probs, probs.argmax(0)

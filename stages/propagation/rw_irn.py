"""IRN's random walk (Ahn et al., CVPR 2019, ``jiwoon-ahn/irn``): the stride-4 CAM x (1 - B) walked over the
boundary affinities of IRNet, then a constant background (stages/propagation/random_walk.py has the kernel)."""

from __future__ import annotations

import numpy as np
import torch

from stages.config import PropagateConfig
from stages.propagation.method import AFFINITY_NET, PropagationMethod
from stages.propagation.random_walk import propagate_irn


def run(cfg: PropagateConfig, cams: dict[str, np.ndarray], inputs: dict[str, np.ndarray],
        size: tuple[int, int], device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    return propagate_irn(cams["cam"], inputs["boundary"], size, beta=cfg.beta, steps=cfg.steps,
                         radius=cfg.radius, bg_threshold=cfg.bg_threshold, device=device)


METHOD = PropagationMethod(name="rw_irn", run=run, trained_by=AFFINITY_NET, affinity_method="irnet",
                           reference="IRN, Ahn et al. CVPR 2019 (jiwoon-ahn/irn)")

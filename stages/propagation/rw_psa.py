"""PSA's random walk (Ahn & Kwak, CVPR 2018, ``jiwoon-ahn/psa``; SEAM reuses it): the background
(1 - max CAM)^alpha propagated with the classes over AffinityNet's feature affinities."""

from __future__ import annotations

import numpy as np
import torch

from stages.config import PropagateConfig
from stages.propagation.method import AFFINITY_NET, PropagationMethod
from stages.propagation.random_walk import propagate_psa


def run(cfg: PropagateConfig, cams: dict[str, np.ndarray], inputs: dict[str, np.ndarray],
        size: tuple[int, int], device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    return propagate_psa(cams["high_res"], inputs["features"], alpha=cfg.alpha, beta=cfg.beta,
                         steps=cfg.steps, radius=cfg.radius, device=device)


METHOD = PropagationMethod(name="rw_psa", run=run, trained_by=AFFINITY_NET, affinity_method="affinitynet",
                           reference="PSA, Ahn & Kwak CVPR 2018 (jiwoon-ahn/psa); SEAM, Wang et al. CVPR 2020")

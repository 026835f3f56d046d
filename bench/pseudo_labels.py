"""Throughput of the pseudo-label stages on the embedded ``demo`` profile (112x144 images), images/s.

Seed extraction per rule (two CRFs per image each), affinity-net inference (IRNet boundary map with its
mirror pass; AffinityNet feature map), and Propagate's whole per-image step (affinity inference plus the
random walk). The nets are ``resnet_mini`` with random weights: throughput does not depend on them.
CAMs are smooth bumps at the objects' classes, like real CAMs in shape and value range.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch

from data.synthetic import PROFILES, render_sample
from models.affinity import AffinityNet, IRNet
from models.resnet import create_backbone
from stages.affinity.train import infer_affinity_input
from stages.config import ExtractSeedsConfig, PropagateConfig
from stages.propagation.propagate import PROPAGATION_METHODS
from stages.seeds.rules import SEED_METHODS


def _cams(rng: np.random.Generator, sample, k_max: int = 3) -> tuple[np.ndarray, list[int]]:
    keys = sorted({o.cls + 1 for o in sample.objects})[:k_max]
    h, w = sample.semantic.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cams = []
    for key in keys:
        ys, xs = np.nonzero(sample.semantic == key)
        cy, cx = (ys.mean(), xs.mean()) if len(ys) else (h / 2, w / 2)
        s = rng.uniform(0.1, 0.25) * min(h, w)
        cams.append(np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s)))
    return np.stack(cams).astype(np.float32), keys


def bench_pseudo_labels(n_images: int = 40) -> dict:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    prof = PROFILES["demo"]
    samples = [render_sample(0, "train", i, prof) for i in range(n_images)]
    inputs = [(s.image, *_cams(rng, s)) for s in samples]
    cpu = torch.device("cpu")
    out: dict = {"images": n_images, "size": f"{prof.height}x{prof.width}"}

    for rule in SEED_METHODS.names():
        cfg = dataclasses.replace(ExtractSeedsConfig(), seed_method=rule)
        fn = SEED_METHODS.get(rule)
        start = time.perf_counter()
        for rgb, cam, keys in inputs:
            fn(rgb, cam, keys, cfg)
        out[f"seeds_{rule}_images_per_s"] = n_images / (time.perf_counter() - start)

    nets = {"irnet": IRNet(create_backbone("resnet_mini")).eval(),
            "affinitynet": AffinityNet(create_backbone("resnet_mini")).eval()}
    methods = {"irnet": "rw_irn", "affinitynet": "rw_psa"}
    for name, net in nets.items():
        with torch.no_grad():
            infer_affinity_input(net, inputs[0][0], cpu)  # warm-up
            start = time.perf_counter()
            affinity = [infer_affinity_input(net, rgb, cpu) for rgb, _, _ in inputs]
            out[f"{name}_inference_images_per_s"] = n_images / (time.perf_counter() - start)
        cfg = PropagateConfig(propagation=methods[name])
        method = PROPAGATION_METHODS.get(cfg.propagation)
        start = time.perf_counter()
        for (rgb, cam, _), aff in zip(inputs, affinity):
            h, w = rgb.shape[:2]
            low = torch.nn.functional.interpolate(torch.from_numpy(cam)[None], (math.ceil(h / 4), math.ceil(w / 4)),
                                                  mode="bilinear", align_corners=False)[0].numpy()
            method(cfg, {"cam": low, "high_res": cam}, aff, (h, w), cpu)
        walk = time.perf_counter() - start
        out[f"{methods[name]}_walk_images_per_s"] = n_images / walk
        out[f"propagate_{methods[name]}_images_per_s"] = n_images / (walk + n_images /
                                                                     out[f"{name}_inference_images_per_s"])
    return out


if __name__ == "__main__":
    for key, value in bench_pseudo_labels().items():
        print(f"{key:<40} {value:.4g}" if isinstance(value, float) else f"{key:<40} {value}")

"""Dense CRF backends on one VOC-size image: pydensecrf (the C++ reference) against our torch mean field.

One 500x375 image (a synthetic render of the ``large`` profile, upscaled) and 21 labels of smooth random
softmax scores, 10 mean-field iterations, with the deeplab_test and psa_seeds parameters. Reported per
preset: seconds for pydensecrf (single-threaded by construction), torch on the CPU with one thread and with
all threads, the ratio torch (1 thread) / pydensecrf, the argmax agreement (%) and the largest marginal
difference between the two backends; where CUDA is available, the CUDA seconds (synchronised, after a
warm-up run) and their speed-up over pydensecrf. Every time includes building the lattices.

``python -m bench.crf`` prints the figures as JSON (keys ``<preset>.<figure>``); ``make bench`` includes them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data.synthetic import PROFILES, render_sample  # noqa: E402
from stages.refine.crf import CRF_PRESETS, dense_crf  # noqa: E402

BENCH_PRESETS = ("deeplab_test", "psa_seeds")


def bench_inputs(h: int = 375, w: int = 500, n_labels: int = 21, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A textured uint8 image (H, W, 3) and smooth softmax scores (n, H, W) float32."""
    rgb = cv2.resize(render_sample(seed, "train", 3, PROFILES["large"]).image, (w, h), interpolation=cv2.INTER_LINEAR)
    rng = np.random.default_rng(seed)
    coarse = rng.normal(0.0, 3.0, (h // 24 + 2, w // 24 + 2, n_labels)).astype(np.float32)
    logits = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC).transpose(2, 0, 1)
    scores = np.exp(logits - logits.max(0, keepdims=True))
    return rgb, (scores / scores.sum(0, keepdims=True)).astype(np.float32)


def _best_of(fn, repeat: int) -> tuple[float, np.ndarray]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def _cuda_seconds(run, repeat: int) -> float:
    run()                                  # warm-up: CUDA context, kernels, allocator
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def _bench_preset(rgb: np.ndarray, scores: np.ndarray, name: str, repeat: int, all_threads: int) -> dict:
    preset = CRF_PRESETS.get(name)
    args = (rgb, scores, preset.gaussian, preset.bilateral, preset.iterations)
    t_ref, ref = _best_of(lambda: dense_crf(*args, backend="pydensecrf"), repeat)
    torch.set_num_threads(1)
    t_one, ours = _best_of(lambda: dense_crf(*args, backend="torch", device="cpu"), repeat)
    torch.set_num_threads(all_threads)
    t_all, _ = _best_of(lambda: dense_crf(*args, backend="torch", device="cpu"), repeat)
    row = {"params": "gaussian {:g}/{:g}, bilateral {:g}/{:g}/{:g}".format(*preset.gaussian, *preset.bilateral),
           "pydensecrf_s": t_ref, "torch_cpu_1thread_s": t_one, "torch_cpu_all_threads_s": t_all,
           "ratio_torch_1thread_vs_pydensecrf": t_one / t_ref,
           "ratio_torch_all_threads_vs_pydensecrf": t_all / t_ref,
           "argmax_agreement_pct": 100.0 * float((ours.argmax(0) == ref.argmax(0)).mean()),
           "max_abs_marginal_diff": float(np.abs(ours - ref).max())}
    if torch.cuda.is_available():
        out: list = []
        t_cuda = _cuda_seconds(lambda: out.append(dense_crf(*args, backend="torch", device="cuda")), repeat)
        row.update({"cuda_s": t_cuda, "cuda_speedup_vs_pydensecrf": t_ref / t_cuda,
                    "cuda_argmax_agreement_pct": 100.0 * float((out[-1].argmax(0) == ref.argmax(0)).mean()),
                    "cuda_max_abs_marginal_diff": float(np.abs(out[-1] - ref).max()),
                    "cuda_device": torch.cuda.get_device_name()})
    return row


def bench_crf(repeat: int = 3, h: int = 375, w: int = 500, n_labels: int = 21) -> dict:
    rgb, scores = bench_inputs(h, w, n_labels)
    threads_before = torch.get_num_threads()
    all_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    results: dict = {"size": f"{w}x{h}", "labels": n_labels, "iterations": 10, "repeat": repeat,
                     "cpu_threads_all": all_threads}
    try:
        for name in BENCH_PRESETS:   # flat keys, like the other benches' tables
            row = _bench_preset(rgb, scores, name, repeat, all_threads)
            results.update({f"{name}.{key}": value for key, value in row.items()})
    finally:
        torch.set_num_threads(threads_before)
    return results


if __name__ == "__main__":
    print(json.dumps(bench_crf(), indent=1))

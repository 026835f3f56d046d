"""GMNet's graph-matching loss and part training step (``python -m bench.gm_loss [--full]``).

1. The loss: our Gram form (one dilation per class, one (C, N) x (N, C) product) against a literal port of the
   reference's loop over pairs of present classes (both masks dilated per pair, overlap counted), on blocky
   random part maps with 255 holes and every class present, at C = 28 / 58 / 108: seconds (Gram: best of 2
   after the first call; loop: one call, timed while its peak memory is measured, as at 513² and C = 108 a
   call takes minutes on a CPU), peak MiB above the start, and the two values (equal to 1e-6). Sizes: the demo
   batch (10 x 112^2) and, with ``--full``, GMNet's 513^2 (batch 2 on a CPU; the reference trains batch 10).
2. The part training step on ``resnet_mini`` at the demo batch and crop: plain DeepLab-v3+ (the baseline),
   + conditioning and + GM (st) at GMNet's scaling (conditioning widths x head width / 256, GM on the labels'
   grid), then as ``configs/demo_parts.cfg`` runs them (its ``cond_mult``, ``cond_stride`` and
   ``gm_resolution``), alone and both; the overhead of each as a fraction of the baseline step.

Seconds are wall time; ``--cpu-time`` counts the process's CPU seconds instead (``time.process_time``), for a
shared machine where other jobs take the cores: with one thread (``OMP_NUM_THREADS=1``) that is the work done,
whatever the waiting.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.measure import PeakMemory
from models.segmenters import create_segmenter
from stages.config import TrainPartSegmentationConfig
from stages.parts.graph_matching import dilate, graph_matching_maps
from stages.parts.train import part_losses

clock: Callable[[], float] = time.perf_counter     # time.process_time with --cpu-time


def loop_gm(pred: torch.Tensor, labels: torch.Tensor, num_classes: int, dilation: int = 2) -> float:
    """The reference's nested loop over present-class pairs (TF while-loops in utils/train_utils.py)."""
    pred = torch.where(labels == 255, torch.full_like(pred, 255), pred)
    zeroed = [torch.where(y == 255, torch.zeros_like(y), y) for y in (pred, labels)]
    classes = torch.unique(torch.cat([z.reshape(-1) for z in zeroed])).tolist()[1:]

    def graph(y: torch.Tensor) -> torch.Tensor:
        adj = torch.zeros(num_classes, num_classes, dtype=torch.float64)
        for i, k in enumerate(classes):
            for m in classes[i + 1:]:
                dk = dilate((y == k).float()[:, None], dilation)
                dm = dilate((y == m).float()[:, None], dilation)
                adj[k, m] = torch.count_nonzero(dk * dm).item()
        return adj * torch.rsqrt((adj * adj).sum(0, keepdim=True).clamp_min(1e-12))

    return ((graph(pred) - graph(labels)) ** 2).sum().item() / num_classes


def part_maps(batch: int, size: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of 8 px with every class present, 5% holes; a prediction with 20% of the pixels changed."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, classes, (batch, -(-size // 8), -(-size // 8)), generator=gen)
    coarse.view(-1)[:classes] = torch.arange(classes)
    labels = coarse.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, :size, :size].contiguous()
    labels[torch.rand(labels.shape, generator=gen) < 0.05] = 255
    noise = torch.randint(0, classes, labels.shape, generator=gen)
    pred = torch.where(torch.rand(labels.shape, generator=gen) < 0.2, noise, labels)
    return torch.where(pred == 255, noise, pred), labels


def _measure(fn, repeat: int) -> tuple[float, float, float]:
    """(seconds, peak MiB of the first call, value): the best of ``repeat - 1`` calls after the measured first
    one, or with ``repeat = 1`` that first call itself (one call in all: the literal loop at 513² and C = 108
    takes minutes per call on a CPU)."""
    start = clock()
    with PeakMemory() as mem:
        value = fn()
    best = clock() - start
    if repeat > 1:
        best = float("inf")
        for _ in range(repeat - 1):
            start = clock()
            fn()
            best = min(best, clock() - start)
    return best, mem.peak / 2**20, value


def _gram_value(pred: torch.Tensor, labels: torch.Tensor, classes: int) -> float:
    return graph_matching_maps(pred, labels, classes).item()


def gm_table(rows: list[dict]) -> str:
    """The loss rows as a Markdown table."""
    lines = ["| batch x size² | C | Gram s | loop s | speed-up | Gram peak MiB | loop peak MiB | |Δ value| |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['batch']} x {r['size']}² | {r['classes']} | {r['gram_s']:.3g} | {r['loop_s']:.3g} | "
                     f"{r['speedup']:.3g}× | {r['gram_peak_mib']:.4g} | {r['loop_peak_mib']:.4g} | "
                     f"{r['abs_difference']:.1e} |")
    return "\n".join(lines)


def bench_gm_loss(sizes: tuple[tuple[int, int], ...] = ((10, 112),), classes: tuple[int, ...] = (28, 58, 108),
                  repeat: int = 3, loop_repeat: int = 1) -> list[dict]:
    rows = []
    for batch, size in sizes:
        for c in classes:
            pred, labels = part_maps(batch, size, c)
            gram_s, gram_mib, gram_value = _measure(partial(_gram_value, pred, labels, c), repeat)
            loop_s, loop_mib, loop_value = _measure(partial(loop_gm, pred, labels, c), loop_repeat)
            rows.append({"batch": batch, "size": size, "classes": c, "gram_s": gram_s, "loop_s": loop_s,
                         "speedup": loop_s / gram_s, "gram_peak_mib": gram_mib, "loop_peak_mib": loop_mib,
                         "gram_value": gram_value, "loop_value": loop_value,
                         "abs_difference": abs(gram_value - loop_value)})
            print(gm_table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)   # progress: a row a size
    return rows


def _train_step(conditioned: bool, gm_mode: str, cond_mult: float = 0.0, cond_stride: int = 1,
                gm_resolution: str = "label", batch: int = 10, crop: int = 112, parts: int = 28, objects: int = 11):
    torch.manual_seed(0)
    extra = {"num_objects": objects, "cond_mult": cond_mult or None, "cond_stride": cond_stride} if conditioned else {}
    net = create_segmenter("gmnet" if conditioned else "deeplabv3plus", "resnet_mini", parts, freeze_bn=False,
                           **extra).train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    cfg = TrainPartSegmentationConfig(gm_mode=gm_mode, gm_resolution=gm_resolution, freeze_bn=False)
    x = torch.randn(batch, 3, crop, crop)
    maps = F.one_hot(torch.randint(0, objects, (batch, crop, crop)), objects).permute(0, 3, 1, 2).float()
    y = torch.randint(0, parts, (batch, crop, crop))
    owner = torch.arange(parts) % objects
    o = owner[y]

    def step() -> None:
        logits = net(x, maps) if conditioned else net(x)
        loss, _ = part_losses(logits, y, o, owner, objects, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def demo_recipe() -> TrainPartSegmentationConfig:
    """The part knobs the step bench varies, as ``configs/demo_parts.cfg`` (and its bases) set them."""
    # imported here: importing pipeline installs a preset chain, which bench.gpu_parts chooses for itself
    from pipeline.presets import chain, read_file

    knobs: dict[str, str] = {}
    for path in chain(Path(__file__).resolve().parent.parent / "configs" / "demo_parts.cfg"):
        parser = read_file(path)
        if parser.has_section("TrainPartSegmentation"):
            knobs.update(parser["TrainPartSegmentation"])
    default = TrainPartSegmentationConfig()
    return TrainPartSegmentationConfig(gm_mode=knobs.get("gm_mode", default.gm_mode),
                                       cond_mult=float(knobs.get("cond_mult", default.cond_mult)),
                                       cond_stride=int(knobs.get("cond_stride", default.cond_stride)),
                                       gm_resolution=knobs.get("gm_resolution", default.gm_resolution))


def part_step_variants(demo: TrainPartSegmentationConfig) -> dict[str, dict]:
    """The steps timed: plain DeepLab-v3+; GMNet's conditioning at the spec's width rule (head width / 256) and
    its GM at the label's resolution; the demo preset's conditioning width and GM resolution, alone and both."""
    conditioning = {"cond_mult": demo.cond_mult, "cond_stride": demo.cond_stride}
    return {"plain": {"conditioned": False, "gm_mode": "off"},
            "conditioning_width_rule": {"conditioned": True, "gm_mode": "off"},
            "gm_st_label": {"conditioned": False, "gm_mode": "st"},
            "conditioning_demo": {"conditioned": True, "gm_mode": "off", **conditioning},
            "gm_st_demo": {"conditioned": False, "gm_mode": "st", "gm_resolution": demo.gm_resolution},
            "demo_recipe": {"conditioned": True, "gm_mode": demo.gm_mode, "gm_resolution": demo.gm_resolution,
                            **conditioning}}


def bench_part_step(repeat: int = 5, rounds: int = 3) -> dict:
    """Seconds per step of each variant (the best of ``rounds`` means of ``repeat`` steps, the variants taken
    in turn each round so that a slow spell of the machine hits them all) and the overhead over plain."""
    demo = demo_recipe()
    variants = part_step_variants(demo)
    steps = {name: _train_step(**kwargs) for name, kwargs in variants.items()}
    seconds = dict.fromkeys(steps, float("inf"))
    for step in steps.values():
        step()
    for _ in range(rounds):
        for name, step in steps.items():
            start = clock()
            for _ in range(repeat):
                step()
            seconds[name] = min(seconds[name], (clock() - start) / repeat)
    base = seconds["plain"]
    return {"threads": torch.get_num_threads(), "demo_cond_mult": demo.cond_mult,
            "demo_cond_stride": demo.cond_stride, "demo_gm_resolution": demo.gm_resolution,
            **{f"{k}_step_s": v for k, v in seconds.items()},
            **{f"{k}_overhead": v / base - 1 for k, v in seconds.items() if k != "plain"}}


def bench_gm(full: bool = False) -> dict:
    sizes = ((10, 112), (2, 513)) if full else ((10, 112),)
    return {"loss": bench_gm_loss(sizes), "part_step": bench_part_step()}


if __name__ == "__main__":
    if "--cpu-time" in sys.argv:
        clock = time.process_time
    result = bench_gm(full="--full" in sys.argv)
    result["clock"] = clock.__name__
    print(gm_table(result["loss"]), file=sys.stderr)
    print(json.dumps(result))

"""The measured parts of ``make gpu-check``; bench/gpu_check.py runs each in a process of its own, with a timeout.

``python -m bench.gpu_parts PART --out FILE --work DIR [--dry-run]`` writes one JSON object to FILE:
``device`` (where it ran), ``figures`` (every number measured), ``summary`` (one line for the table),
``target`` and ``verdict`` (``met``, ``not met`` or ``n/a``). Each part reuses the bench module that measures
the same thing on the CPU (bench/crf.py, bench/random_walk.py, bench/segmentation.py), at VOC's size
(500x375, 21 classes) on CUDA. ``--dry-run`` runs the same code on tiny sizes on the CPU (gpu_check hides every
CUDA device from it): it proves the plumbing, and its verdicts are ``n/a``, never a CUDA result.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


@dataclass(frozen=True)
class Sizes:
    height: int
    width: int
    labels: int          # CRF labels
    walk_image: str      # bench.random_walk.IMAGES key
    repeat: int
    deeplab: dict        # bench.segmentation.precision_step_rates arguments
    profile_preset: str  # the preset the shard parts build on
    shard_size: int
    gmnet: dict          # part_gmnet: overrides of configs/voc_part58.cfg's knobs, and the steps timed


GPU = Sizes(375, 500, 21, "voc", 3, {"backbone": "resnet101", "classes": 21, "batch": 5, "crop": 321, "repeat": 5},
            "demo.cfg", 160, {"knobs": {}, "steps": 200, "baseline_steps": 50, "warmup": 3, "loss_repeat": 20})
DRY = Sizes(30, 40, 3, "demo", 1, {"backbone": "resnet_mini", "classes": 3, "batch": 2, "crop": 33, "repeat": 1},
            "tiny.cfg", 8, {"knobs": {"backbone": "resnet_mini", "batch_size": 2, "crop_size": 65}, "steps": 2,
                            "baseline_steps": 1, "warmup": 1, "loss_repeat": 1})

CRF_TARGET_SPEEDUP, CRF_TARGET_AGREEMENT, WALK_TARGET_MS = 50.0, 99.0, 5.0


def device_name() -> str:
    import torch
    return f"cuda: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "cpu"


def verdict(dry_run: bool, met: bool) -> str:
    return "n/a" if dry_run else ("met" if met else "not met")


# -------------------------------------------------------------------------------------------------- parts


def part_env(sizes: Sizes, dry_run: bool, work: Path) -> dict:
    """What the check runs with: interpreter, torch and its CUDA build, the device, the project's dependencies."""
    import importlib.metadata as metadata

    import torch
    figures = {"python": sys.version.split()[0], "executable": sys.executable, "torch": torch.__version__,
               "torch_cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
               "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        figures.update({"cuda_devices": torch.cuda.device_count(), "cuda_device_mib": props.total_memory // 2**20,
                        "cudnn": torch.backends.cudnn.version()})
    for dist in ("luigi", "pydensecrf2", "PyMaxflow", "h5py", "opencv-python-headless", "submitit", "numpy", "scipy"):
        try:
            figures[f"version_{dist}"] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            figures[f"version_{dist}"] = None
    missing = [k[len("version_"):] for k, v in figures.items() if k.startswith("version_") and v is None]
    summary = f"torch {torch.__version__} (CUDA build {torch.version.cuda}), {device_name()}"
    if missing:
        summary += f"; missing: {', '.join(missing)}"
    return {"figures": figures, "summary": summary, "target": "CUDA device and every dependency",
            "verdict": verdict(dry_run, torch.cuda.is_available() and not missing)}


def part_crf(sizes: Sizes, dry_run: bool, work: Path) -> dict:
    """The torch CRF (CUDA) against pydensecrf on one core, both presets of bench/crf.py."""
    from bench.crf import BENCH_PRESETS, bench_crf
    figures = bench_crf(repeat=sizes.repeat, h=sizes.height, w=sizes.width, n_labels=sizes.labels)
    lines, met = [], True
    for name in BENCH_PRESETS:
        ref = figures[f"{name}.pydensecrf_s"]
        if f"{name}.cuda_s" in figures:
            speedup, agree = figures[f"{name}.cuda_speedup_vs_pydensecrf"], figures[f"{name}.cuda_argmax_agreement_pct"]
            lines.append(f"{name}: CUDA {1000 * figures[f'{name}.cuda_s']:.1f} ms vs pydensecrf {1000 * ref:.0f} ms "
                         f"= {speedup:.0f}x, argmax {agree:.2f}%")
            met = met and speedup >= CRF_TARGET_SPEEDUP and agree >= CRF_TARGET_AGREEMENT
        else:
            lines.append(f"{name}: torch CPU 1 thread {figures[f'{name}.ratio_torch_1thread_vs_pydensecrf']:.2f}x "
                         f"pydensecrf's time, argmax {figures[f'{name}.argmax_agreement_pct']:.2f}% (no CUDA)")
            met = False
    return {"figures": figures, "summary": "; ".join(lines),
            "target": f">= {CRF_TARGET_SPEEDUP:g}x pydensecrf, argmax >= {CRF_TARGET_AGREEMENT:g}%",
            "verdict": verdict(dry_run, met)}


def part_walk(sizes: Sizes, dry_run: bool, work: Path) -> dict:
    """IRN's walk (t = 256 at VOC size): sparse on CUDA against sparse on the CPU and the dense T^t on CUDA."""
    import numpy as np
    import torch

    from bench.measure import in_fresh_process
    from bench.random_walk import IMAGES
    name = sizes.walk_image
    cuda = "cuda" if torch.cuda.is_available() else "cpu"
    variants = [("sparse", "cpu"), ("sparse", cuda), ("dense", cuda)]
    variants = list(dict.fromkeys(variants))                      # without CUDA: sparse and dense on the CPU
    figures: dict = {"image": name, "size": "{1}x{0}".format(*IMAGES[name]), "walk_steps": IMAGES[name][2]}
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        labels = {}
        for variant, dev in variants:
            measured = in_fresh_process("bench.random_walk", "--variant", f"{name}:{variant}:{dev}", "--out", tmp)
            key = f"{variant}_{dev}"
            figures.update({f"{key}_ms": 1000 * measured["seconds"], f"{key}_first_call_ms":
                            1000 * measured["first_seconds"], f"{key}_peak_mib": measured["peak_bytes"] / 2**20,
                            f"{key}_memory_method": measured["memory_method"]})
            labels[key] = np.load(Path(tmp) / f"{name}_{variant}_{dev}_label.npy")
    for key, label in labels.items():
        if key != "sparse_cpu":
            figures[f"{key}_label_agreement_pct_vs_sparse_cpu"] = 100 * float((label == labels["sparse_cpu"]).mean())
    if cuda == "cuda":
        ms = figures["sparse_cuda_ms"]
        figures.update({"sparse_cuda_images_per_s": 1000 / ms,
                        "speedup_sparse_cuda_vs_sparse_cpu": figures["sparse_cpu_ms"] / ms,
                        "speedup_sparse_cuda_vs_dense_cuda": figures["dense_cuda_ms"] / ms})
        summary = (f"sparse CUDA {ms:.2f} ms/image ({figures['sparse_cuda_peak_mib']:.0f} MiB), "
                   f"{figures['speedup_sparse_cuda_vs_sparse_cpu']:.1f}x the CPU sparse walk, "
                   f"{figures['speedup_sparse_cuda_vs_dense_cuda']:.1f}x dense T^t on CUDA "
                   f"({figures['dense_cuda_peak_mib']:.0f} MiB); labels "
                   f"{figures['sparse_cuda_label_agreement_pct_vs_sparse_cpu']:.2f}% = CPU")
        met = ms <= WALK_TARGET_MS and figures["sparse_cuda_label_agreement_pct_vs_sparse_cpu"] >= 99.9
    else:
        summary = (f"sparse CPU {figures['sparse_cpu_ms']:.1f} ms, dense CPU {figures['dense_cpu_ms']:.1f} ms, labels "
                   f"{figures['dense_cpu_label_agreement_pct_vs_sparse_cpu']:.2f}% equal (no CUDA)")
        met = False
    return {"figures": figures, "summary": summary, "target": f"<= {WALK_TARGET_MS:g} ms per VOC image on CUDA",
            "verdict": verdict(dry_run, met)}


def part_deeplab(sizes: Sizes, dry_run: bool, work: Path) -> dict:
    """DeepLab-v2 MSC training step, AMP (bfloat16) + channels-last against float32."""
    import torch

    from bench.segmentation import precision_step_rates
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    figures = precision_step_rates(device, **sizes.deeplab)
    summary = (f"{figures['backbone']} crop {figures['crop']} batch {figures['batch']}: float32 "
               f"{figures['fp32_images_per_s']:.1f} img/s, AMP+channels-last "
               f"{figures['amp_channels_last_images_per_s']:.1f} img/s ({figures['speedup_amp_channels_last']:.2f}x)")
    if figures["fp32_peak_mib"] is not None:
        summary += f"; peak {figures['fp32_peak_mib']:.0f} vs {figures['amp_channels_last_peak_mib']:.0f} MiB"
    return {"figures": figures, "summary": summary, "target": "AMP + channels-last faster than float32",
            "verdict": verdict(dry_run or device.type != "cuda", figures["speedup_amp_channels_last"] > 1)}


def preset_config(preset: str, family: str):
    """A stage's config as ``configs/<preset>`` sets it, read the way the pipeline reads it (the preset's
    weights files are neither checked nor loaded). Call it once per process: the preset is read on import."""
    os.environ["LUIGI_CONFIG_PATH"] = str(REPO / "configs" / preset)
    import pipeline.tasks
    from pipeline.framework import plain_value
    task = getattr(pipeline.tasks, family)
    names = {f.name for f in dataclasses.fields(task.config_class)}
    return task.config_class(**{name: plain_value(param.task_value(family, name))
                                for name, param in task.get_params() if name in names})


def batch_statistics(model) -> None:
    """BatchNorm on batch statistics: the recipe freezes BN on the pretrained statistics, but these weights are
    random, and frozen identity statistics let activations grow through 101 layers (on the CPU at crop 97: logits
    ~1e3 at step 0, NaN by step 3; on the H200 the 200 steps ended NaN). BN's affine parameters stay untrained."""
    import torch.nn as nn
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train()


def part_gmnet(sizes: Sizes, dry_run: bool, work: Path) -> dict:
    """GMNet's Pascal-Part-58 recipe (configs/voc_part58.cfg: DeepLab-v3+ ResNet-101 conditioned on the 21 object
    maps, 58 parts, batch 10, crop 513, part CE + aux + GM ``st`` at lambda 0.1) on random weights (so BN on batch
    statistics, see ``batch_statistics``) and blocky random part maps: a few hundred training steps with GM ``st``
    against steps with GM off; seconds per step, peak allocated MiB, the loss at the first and last step, and the
    GM loss's share of the step (the two steps' difference, and the loss's own forward and backward at the step's
    size)."""
    import torch
    import torch.nn.functional as F

    from bench.gm_loss import part_maps
    from data.labelspace import VOC_LABEL_SPACE
    from data.parts import load_part_space
    from stages.parts.graph_matching import graph_matching_loss
    from stages.parts.train import build_part_model, param_groups, part_losses
    from stages.training.optim import make_optimizer
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = True
    cfg = dataclasses.replace(preset_config("voc_part58.cfg", "TrainPartSegmentation"), **sizes.gmnet["knobs"])
    space = load_part_space(cfg.part_space, work, VOC_LABEL_SPACE)
    torch.manual_seed(cfg.seed)
    _, parts = part_maps(cfg.batch_size, cfg.crop_size, space.num_parts, cfg.seed)
    owner = torch.tensor(space.object_of_part)
    objects = torch.where(parts == 255, parts, owner[parts.clamp(max=space.num_parts - 1)])
    maps = F.one_hot(objects.clamp(max=space.num_objects - 1), space.num_objects).permute(0, 3, 1, 2).float()
    images = torch.randn(cfg.batch_size, 3, cfg.crop_size, cfg.crop_size)
    images, parts, objects, maps, owner = (t.to(device) for t in (images, parts, objects, maps, owner))

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize(device)

    def seconds_per_step(gm_mode: str, steps: int) -> tuple[float, float | None, float]:
        run_cfg = dataclasses.replace(cfg, gm_mode=gm_mode)
        model = build_part_model(run_cfg, space, pretrained=False).to(device).train()
        batch_statistics(model)
        optimizer = make_optimizer(param_groups(model, run_cfg), lr=cfg.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay)
        losses = []

        def step() -> None:
            loss, _ = part_losses(model(images, maps), parts, objects, owner, space.num_objects, run_cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        for _ in range(sizes.gmnet["warmup"]):
            step()
        sync()
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        elapsed = (time.perf_counter() - start) / steps
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if on_cuda else None
        return elapsed, peak, (losses[0], losses[-1])

    st_s, st_mib, (first_loss, st_loss) = seconds_per_step(cfg.gm_mode, sizes.gmnet["steps"])
    if on_cuda:
        torch.cuda.empty_cache()    # the first model's cached blocks would hide the second one's peak
    off_s, off_mib, _ = seconds_per_step("off", sizes.gmnet["baseline_steps"])
    logits = torch.randn(cfg.batch_size, space.num_parts, cfg.crop_size, cfg.crop_size, device=device,
                         requires_grad=True)
    graph_matching_loss(logits, parts, cfg.gm_mode, cfg.gm_dilation, cfg.gm_valid).backward()
    sync()
    start = time.perf_counter()
    for _ in range(sizes.gmnet["loss_repeat"]):
        graph_matching_loss(logits, parts, cfg.gm_mode, cfg.gm_dilation, cfg.gm_valid).backward()
    sync()
    loss_s = (time.perf_counter() - start) / sizes.gmnet["loss_repeat"]
    figures = {"backbone": cfg.backbone, "parts": space.num_parts, "objects": space.num_objects,
               "batch": cfg.batch_size, "crop": cfg.crop_size, "gm_mode": cfg.gm_mode, "gm_lambda": cfg.gm_lambda,
               "steps": sizes.gmnet["steps"], "baseline_steps": sizes.gmnet["baseline_steps"],
               "step_s": st_s, "step_gm_off_s": off_s, "peak_mib": st_mib, "peak_gm_off_mib": off_mib,
               "first_loss": first_loss, "last_loss": st_loss, "gm_loss_forward_backward_s": loss_s,
               "gm_share_of_step": loss_s / st_s, "gm_step_overhead": st_s / off_s - 1}
    summary = (f"{cfg.backbone} {space.num_parts} parts, batch {cfg.batch_size}, crop {cfg.crop_size}, "
               f"{sizes.gmnet['steps']} steps: {st_s:.3f} s/step with GM {cfg.gm_mode} vs {off_s:.3f} off "
               f"({100 * figures['gm_step_overhead']:+.1f}%); GM loss alone {1000 * loss_s:.1f} ms "
               f"({100 * figures['gm_share_of_step']:.1f}% of the step); loss {first_loss:.2f} -> {st_loss:.2f}")
    if st_mib is not None:
        summary += f"; peak {st_mib:.0f} MiB ({off_mib:.0f} without GM)"
    return {"figures": figures, "summary": summary,
            "target": "a finite loss after the steps, on CUDA (the figures are the result)",
            "verdict": verdict(dry_run or not on_cuda, math.isfinite(st_loss))}


# ---------------------------------------------------------------------------------------- pipeline parts


def shard_config(sizes: Sizes, dry_run: bool, work: Path) -> Path:
    """A short chain on the preset's data: few pretraining steps and one epoch per net (throughput of the
    shards does not depend on the weights). The dry run pins the CPU."""
    cfg = work / "pipeline.cfg"
    runtime = "device = cpu\ntorch_threads = 1\nloader_workers = 0" if dry_run else "loader_workers = 4"
    cfg.write_text(f"""[preset]
base = {REPO / 'configs' / sizes.profile_preset}
[wsss]
work_dir = {work / 'work'}
gpu_lock_dir = {work / 'gpu-locks'}
gpu_wait_s = 600
{runtime}
[PretrainBackbone]
steps = 20
eval_images = 32
[TrainCAM]
num_epochs = 1
[TrainAffinity]
num_epochs = 1
[MakeCAM]
shard_size = {sizes.shard_size}
[ExtractSeeds]
shard_size = {sizes.shard_size}
[Propagate]
shard_size = {sizes.shard_size}
""")
    return cfg


def luigi(cfg: Path, *args: str) -> float:
    """``luigi --module pipeline ARGS`` (local scheduler) with this preset; its wall seconds. Raises with the
    log's tail when the run fails."""
    env = dict(os.environ, PYTHONPATH=str(REPO), LUIGI_CONFIG_PATH=str(cfg))
    cmd = [sys.executable, "-m", "luigi", "--module", "pipeline", "--local-scheduler", "--no-lock", *args]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def stage_record(work: Path, stage: str) -> tuple[dict, list[dict]]:
    """The published stage's provenance and its shards' records (one JSON per shard, with the GPUs it held)."""
    (stage_dir,) = [p for p in (work / "work" / stage).iterdir() if p.is_dir() and "." not in p.name]
    shards = [json.loads(p.read_text()) for p in sorted(stage_dir.glob("shard-*.json"))]
    return json.loads((stage_dir / "provenance.json").read_text()), shards


def part_shards(sizes: Sizes, dry_run: bool, work: Path) -> dict:
    """MakeCAM and Propagate (IRN walk) shards on the preset's data, images/s of the shards' compute."""
    cfg = shard_config(sizes, dry_run, work)
    figures: dict = {"preset": sizes.profile_preset, "shard_size": sizes.shard_size,
                     "chain_wall_s": luigi(cfg, "Propagate", "--workers", "1")}
    devices = set()
    for stage in ("MakeCAM", "Propagate"):
        provenance, shards = stage_record(work, stage)
        metrics = provenance["metrics"]
        figures.update({f"{stage}_images": metrics["images"], f"{stage}_shards": metrics["shards"],
                        f"{stage}_shard_seconds": metrics["shard_seconds"],
                        f"{stage}_images_per_s": metrics["images"] / max(metrics["shard_seconds"], 1e-9)})
        devices.update(tuple(s.get("gpus", ())) for s in shards)
    figures["shard_gpus"] = sorted(str(list(d)) if d else "none" for d in devices)
    summary = (f"MakeCAM {figures['MakeCAM_images_per_s']:.1f} img/s, Propagate {figures['Propagate_images_per_s']:.1f}"
               f" img/s ({figures['MakeCAM_images']} images, shards of {sizes.shard_size}; GPUs held: "
               f"{', '.join(figures['shard_gpus'])})")
    on_gpu = "none" not in figures["shard_gpus"]
    return {"figures": figures, "summary": summary, "target": "every shard ran on a GPU (images/s reported)",
            "verdict": verdict(dry_run, on_gpu)}


def part_allocator(sizes: Sizes, dry_run: bool, work: Path) -> dict:
    """Two Luigi workers on one device: MakeCAM's shards with --workers 2 against --workers 1; every shard must
    hold the device through pipeline/devices.py's lock (none fails waiting for it)."""
    cfg = shard_config(sizes, dry_run, work)
    env = dict(os.environ, PYTHONPATH=str(REPO), LUIGI_CONFIG_PATH=str(cfg))
    figures: dict = {}
    if not dry_run:       # upstream apart from the timed runs (a no-op after the shards part)
        figures["upstream_wall_s"] = luigi(cfg, "TrainCAM", "--workers", "1")
    devices = set()
    for workers in (2,) if dry_run else (1, 2):   # the dry run checks the plumbing: one run is enough
        subprocess.run([sys.executable, "-m", "pipeline", "clean", "--stage", "MakeCAM"], cwd=REPO, env=env,
                       check=True, capture_output=True)
        figures[f"workers_{workers}_wall_s"] = luigi(cfg, "MakeCAM", "--workers", str(workers))
        _, shards = stage_record(work, "MakeCAM")
        figures[f"workers_{workers}_shards"] = len(shards)
        devices.update(tuple(s.get("gpus", ())) for s in shards)
    figures["shard_gpus"] = sorted(str(list(d)) if d else "none" for d in devices)
    summary = f"MakeCAM {figures['workers_2_shards']} shards: 2 workers {figures['workers_2_wall_s']:.1f} s"
    if "workers_1_wall_s" in figures:
        figures["speedup_2_vs_1"] = figures["workers_1_wall_s"] / figures["workers_2_wall_s"]
        summary += f" vs 1 worker {figures['workers_1_wall_s']:.1f} s ({figures['speedup_2_vs_1']:.2f}x)"
    summary += f"; GPUs held: {', '.join(figures['shard_gpus'])}"
    return {"figures": figures, "summary": summary,
            "target": "both runs complete, every shard on a locked GPU",
            "verdict": verdict(dry_run, "none" not in figures["shard_gpus"])}


PARTS: dict[str, Callable[[Sizes, bool, Path], dict]] = {
    "env": part_env, "crf": part_crf, "walk": part_walk, "deeplab": part_deeplab, "shards": part_shards,
    "allocator": part_allocator, "gmnet": part_gmnet}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=sorted(PARTS))
    parser.add_argument("--out", type=Path, required=True, help="the part's JSON result")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (shared by the pipeline parts)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        import torch
        torch.set_num_threads(1)     # tiny sizes: more threads only contend (CI has 2 shared cores)
    result = PARTS[args.part](DRY if args.dry_run else GPU, args.dry_run, args.work)
    result["device"] = device_name()
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(result["summary"])


if __name__ == "__main__":
    main()

"""What the pipeline checks while scheduling, before any stage starts: names a configuration must find in a
registry (backbones, methods, CRF presets), the weights files it names, and the ``[wsss]`` runtime settings.

The knob list (stages.config) is a leaf and checks values only; these checks need the registries, which live with
the steps and import torch, or the filesystem.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from collections.abc import Callable
from pathlib import Path


def _pretrain(cfg) -> None:
    from models.resnet import BACKBONES
    BACKBONES.get(cfg.backbone, key="PretrainBackbone.backbone")


def _train_cam(cfg) -> None:
    from stages.cam import CAM_METHODS
    CAM_METHODS.module_of(cfg.cam_method, key="TrainCAM.cam_method")


def _extract_seeds(cfg) -> None:
    from stages.seeds.rules import validate_seed_config
    validate_seed_config(cfg)
    from stages.seeds.extract import supervision_merger
    supervision_merger(cfg)


def _train_affinity(cfg) -> None:
    from stages.affinity import AFFINITY_METHODS
    AFFINITY_METHODS.module_of(cfg.affinity_method, key="TrainAffinity.affinity_method")
    if cfg.affinity_method == "irnet" and not cfg.pretrained and not cfg.init_from_cam:
        # IRNet's backbone never trains: without weights its boundary head would learn on random features.
        raise ValueError("TrainAffinity.pretrained is empty and init_from_cam is false: IRNet would train on a "
                         "random, frozen backbone. Set TrainAffinity.pretrained to ImageNet weights (.pth; IRN: a "
                         "separate ImageNet ResNet-50) or synthetic, or init_from_cam = true")


def _propagate(cfg) -> None:
    from stages.propagation.propagate import validate_propagation
    validate_propagation(cfg)


def _refine(cfg) -> None:
    from stages.config import METHOD_CRF
    from stages.refine.crf import CRF_PRESETS
    if cfg.preset != METHOD_CRF:  # else the propagation's record names it (pipeline.tasks.RefineCRF.crf_preset)
        CRF_PRESETS.get(cfg.preset, key="RefineCRF.preset")


def _eval_segmentation(cfg) -> None:
    from stages.refine.crf import CRF_PRESETS
    CRF_PRESETS.get(cfg.crf_preset, key="EvalSegmentation.crf_preset")


def _train_segmentation(cfg) -> None:
    from models.resnet import BACKBONES
    from models.segmenters import SEGMENTERS
    SEGMENTERS.get(cfg.model, key="TrainSegmentation.model")
    BACKBONES.get(cfg.backbone, key="TrainSegmentation.backbone")


def _train_seed_net(cfg) -> None:
    from stages.seed_net.train import validate_seed_net
    validate_seed_net(cfg)


def _train_parts(cfg) -> None:
    from models.resnet import BACKBONES
    BACKBONES.get(cfg.backbone, key="TrainPartSegmentation.backbone")


def _report(cfg) -> None:
    from pipeline.variants import comparison, segmenter_overrides
    for spec in cfg.compare:
        comparison(spec)  # raises, naming the entry
    for spec in cfg.compare_segmenters:
        segmenter_overrides(spec)  # raises, naming the entry


NAME_CHECKS: dict[str, Callable[[object], None]] = {
    "PretrainBackbone": _pretrain, "TrainCAM": _train_cam, "ExtractSeeds": _extract_seeds,
    "TrainAffinity": _train_affinity, "Propagate": _propagate, "RefineCRF": _refine,
    "EvalSegmentation": _eval_segmentation, "TrainSegmentation": _train_segmentation,
    "TrainSeedNet": _train_seed_net, "TrainPartSegmentation": _train_parts, "Report": _report,
}


def check_names(family: str, cfg: object) -> None:
    """Raise, naming the knob, when ``cfg`` of stage ``family`` names something no registry has."""
    check = NAME_CHECKS.get(family)
    if check is not None:
        check(cfg)


# Knobs naming a weights file a stage loads ("" = none; ``pretrained`` may also say synthetic, a stage's output).
WEIGHTS_KNOBS = ("pretrained", "init_checkpoint")


def check_weights_files(family: str, cfg: object) -> None:
    """Each weights file ``cfg`` names exists and is readable (its content is checked when the stage loads it)."""
    from stages.config import SYNTHETIC_PRETRAINING

    for knob in WEIGHTS_KNOBS:
        value = getattr(cfg, knob, "")
        if not value or (knob == "pretrained" and value == SYNTHETIC_PRETRAINING):
            continue
        path = Path(value)
        where = "" if path.is_absolute() else f" (relative to {os.getcwd()})"
        if not path.exists():
            problem = "no such file"
        elif not path.is_file():
            problem = "not a file"
        elif not os.access(path, os.R_OK):
            problem = "not readable"
        else:
            continue
        raise FileNotFoundError(f"{family}.{knob} = {value!r}: {problem}{where}; it names a weights file (.pth)")


def validate_config(cfg: object, family: str | None = None) -> None:
    """Everything the pipeline checks of stage ``family``'s config before running it (the family of ``cfg``'s
    class by default): values, then registered names, then the weights files it names."""
    from stages import config as C

    cfg = C.with_references(cfg)
    C.validate(cfg)
    family = family or next(name for name, cls in C.STAGE_CONFIGS.items() if isinstance(cfg, cls))
    check_names(family, cfg)
    check_weights_files(family, cfg)


CRF_BACKENDS = ("auto", "torch", "pydensecrf")
AT_LEAST_ONE = ("train_processes", "cut_processes")   # process counts; the other numbers may be 0


@functools.lru_cache(maxsize=16)
def check_runtime(rt) -> None:
    """``[wsss]`` (a ``stages.config.RuntimeConfig``): numbers finite and non-negative (process counts >= 1), a
    known device and CRF backend, a well-formed GPU list, a work directory that is a writable folder where it
    exists. The error names the setting and the value."""
    from pipeline.devices import parse_gpus

    for f in dataclasses.fields(rt):
        value = getattr(rt, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        knob = f"[wsss] {f.name} = {value!r}"
        if not math.isfinite(value):
            raise ValueError(f"{knob}: must be a finite number")
        if value < (1 if f.name in AT_LEAST_ONE else 0):
            raise ValueError(f"{knob}: must be {'at least 1' if f.name in AT_LEAST_ONE else 'non-negative'}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", rt.device):
        raise ValueError(f"[wsss] device = {rt.device!r}; choose auto, cpu, cuda or cuda:N")
    if rt.crf_backend not in CRF_BACKENDS:
        raise ValueError(f"[wsss] crf_backend = {rt.crf_backend!r}; choose one of {', '.join(CRF_BACKENDS)}")
    parse_gpus(rt.gpus)
    work = Path(rt.work_dir)
    if work.exists() and not work.is_dir():
        raise ValueError(f"[wsss] work_dir = {rt.work_dir!r}: exists and is not a directory")
    if work.is_dir() and not os.access(work, os.W_OK | os.X_OK):
        raise ValueError(f"[wsss] work_dir = {rt.work_dir!r}: not writable")

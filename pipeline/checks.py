"""Names a configuration must find in a registry (backbones, methods, CRF presets), checked once per task.

The knob list (stages.config) is a leaf and checks values only; these checks need the registries, which live with
the steps and import torch, so the pipeline runs them while scheduling, before any stage starts.
"""

from __future__ import annotations

from collections.abc import Callable


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


def _propagate(cfg) -> None:
    from stages.propagation.propagate import validate_propagation
    validate_propagation(cfg)


def _refine(cfg) -> None:
    from stages.refine.crf import CRF_PRESETS
    CRF_PRESETS.get(cfg.preset, key="RefineCRF.preset")


def _eval_segmentation(cfg) -> None:
    from stages.refine.crf import CRF_PRESETS
    CRF_PRESETS.get(cfg.crf_preset, key="EvalSegmentation.crf_preset")


def _train_segmentation(cfg) -> None:
    from models.deeplab import SEGMENTERS
    from models.resnet import BACKBONES
    SEGMENTERS.get(cfg.model, key="TrainSegmentation.model")
    BACKBONES.get(cfg.backbone, key="TrainSegmentation.backbone")


def _train_seed_net(cfg) -> None:
    from stages.seed_net.train import validate_seed_net
    validate_seed_net(cfg)


def _report(cfg) -> None:
    from pipeline.variants import variant_overrides
    for spec in cfg.compare:
        variant_overrides(spec)  # raises, naming the entry
    from pipeline.variants import segmenter_overrides
    for spec in cfg.compare_segmenters:
        segmenter_overrides(spec)  # raises, naming the entry


NAME_CHECKS: dict[str, Callable[[object], None]] = {
    "PretrainBackbone": _pretrain, "TrainCAM": _train_cam, "ExtractSeeds": _extract_seeds,
    "TrainAffinity": _train_affinity, "Propagate": _propagate, "RefineCRF": _refine,
    "EvalSegmentation": _eval_segmentation, "TrainSegmentation": _train_segmentation,
    "TrainSeedNet": _train_seed_net, "Report": _report,
}


def check_names(family: str, cfg: object) -> None:
    """Raise, naming the knob, when ``cfg`` of stage ``family`` names something no registry has."""
    check = NAME_CHECKS.get(family)
    if check is not None:
        check(cfg)


def validate_config(cfg: object, family: str | None = None) -> None:
    """Everything the pipeline checks of stage ``family``'s config before running it (the family of ``cfg``'s
    class by default): values, then registered names."""
    from stages import config as C

    C.validate(cfg)
    check_names(family or next(name for name, cls in C.STAGE_CONFIGS.items() if isinstance(cfg, cls)), cfg)

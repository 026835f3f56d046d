"""The stage table: one Luigi task per pipeline step, each a thin wrapper over its ``stages`` package.

A task names the modules it runs for the configured choices (``code_roots``: the chosen method's module, not the
other methods'), the stages it reads (``upstream``) and how to call the step (``compute`` / ``compute_shard``).
Keys, placement, shards and publication are the framework's (pipeline.framework).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import luigi

from data.artifacts import (
    BACKBONE_WEIGHTS,
    METRICS,
    MODEL_WEIGHTS,
    PROVENANCE,
    SCRIBBLE_AFFINITY,
    TRAINING_LOG,
    label_file,
)
from data.io import read_json
from data.manifest import MANIFEST, Manifest
from pipeline import hashing
from pipeline.framework import (
    ShardedStage,
    StageTask,
    TrainingStage,
    manifest_of,
    shard_store,
    stage_in_variant,
    with_config,
)
from pipeline.presets import PROJECT_CFG
from pipeline.settings import runtime
from pipeline.variants import Comparison, PartRun, comparison, part_run, segmenter_overrides
from stages import config as C
from stages.runtime import resolve_device

logger = logging.getLogger("luigi-interface")


@with_config(C.DatasetConfig)
class PrepareDataset(StageTask):
    """Materialise the embedded dataset, or check a VOC-layout one; write the manifest."""

    code = ("stages.dataset.prepare",)

    def fingerprint(self) -> dict:
        from stages.dataset.prepare import input_fingerprint
        fp = input_fingerprint(self.config)
        return {"external_lists": fp} if fp else {}

    def key_params(self, cfg) -> dict:
        params = dataclasses.asdict(cfg)
        del params["fingerprint_mode"]  # how the files are fingerprinted; the fingerprint itself is in the key
        return params

    @property
    def content_key(self) -> str | None:
        """An external dataset's manifest, not the stat of its files: touching a file, or an edit that changes
        nothing the manifest records, reruns PrepareDataset but nothing downstream. None until prepared."""
        if self.config.kind != "voc":
            return self.key
        cached = self.__dict__.get("_content_key")
        if cached is None and self.complete():
            manifest = (self.stage_dir / MANIFEST).read_bytes()
            cached = hashing.stage_key("PrepareDataset.content", self.key_params(self.config), self.code_modules,
                                       {"manifest": hashlib.sha256(manifest).hexdigest()})
            self.__dict__["_content_key"] = cached
        return cached

    def compute(self, out_dir: Path) -> dict:
        from stages.dataset.prepare import prepare_dataset
        manifest = prepare_dataset(self.config, out_dir, processes=max(1, os.cpu_count() or 1),
                                   log=lambda m: logger.warning("PrepareDataset: %s", m))
        return {"n_" + s: len(ids) for s, ids in manifest.splits.items()} | {
            "quarantined": len(manifest.quarantine)}


@with_config(C.PretrainBackboneConfig)
class PretrainBackbone(TrainingStage):
    """Synthetic stand-in for ImageNet weights; used by stages whose ``pretrained`` is ``synthetic``."""

    code = ("stages.pretrain.train",)
    gpus = 1
    # Its DataLoader worker renders every image (about half a core on the demo), and on 80x80 images a second torch
    # thread costs more than it gives: 400 steps took 27.3 s on one thread, 36.9 s on two (2 cores, idle).
    input_cores = 1

    def compute(self, out_dir: Path) -> dict:
        from stages.pretrain.train import pretrain_backbone
        rt = runtime()
        return pretrain_backbone(self.config, out_dir, resolve_device(rt.device), loader_workers=rt.loader_workers,
                                 progress=self.progress, resume_dir=self.resume_dir)


def pretraining_upstream(task: StageTask) -> dict[str, StageTask]:
    """``{"pretrained": PretrainBackbone()}`` when ``task.pretrained`` asks for synthetic weights, else ``{}``."""
    if task.pretrained != C.SYNTHETIC_PRETRAINING:
        return {}
    pretrain = PretrainBackbone()
    if pretrain.backbone != task.backbone:
        raise ValueError(f"{task.get_task_family()}.pretrained = {C.SYNTHETIC_PRETRAINING} needs "
                         f"PretrainBackbone.backbone = {task.backbone} (it is {pretrain.backbone})")
    return {"pretrained": pretrain}


def with_weights_path(task: StageTask):
    """The task's config with ``pretrained = synthetic`` replaced by the pretrained weights' path."""
    cfg = task.run_config
    if cfg.pretrained != C.SYNTHETIC_PRETRAINING:
        return cfg
    return dataclasses.replace(cfg, pretrained=str(task.input_dir("pretrained") / BACKBONE_WEIGHTS))


@with_config(C.TrainCAMConfig)
class TrainCAM(TrainingStage):
    """Train the CAM classification network."""

    code = ("stages.cam.train",)

    def code_roots(self) -> tuple[str, ...]:
        from stages.cam import CAM_METHODS
        return (*self.code, CAM_METHODS.module_of(self.cam_method))

    @property
    def gpus(self) -> int:
        return runtime().train_processes  # one device per DDP rank when on CUDA

    def upstream(self) -> dict[str, StageTask]:
        return {"dataset": self.stage(PrepareDataset), **pretraining_upstream(self)}

    def compute(self, out_dir: Path) -> dict:
        from stages.cam.train import check_divisible, train_cam
        rt = runtime()
        check_divisible(self.batch_size, rt.train_processes)  # before any process starts
        cfg = with_weights_path(self)
        if rt.train_processes == 1:
            return train_cam(cfg, manifest_of(self), out_dir, resolve_device(rt.device),
                             loader_workers=rt.loader_workers, progress=self.progress, resume_dir=self.resume_dir)
        # DDP: a fresh interpreter per rank under torchrun (CUDA cannot live in Luigi's forked workers).
        from stages.cam.train import parse_progress, write_config
        from stages.training.distributed import launch_torchrun

        def forward_progress(line: str) -> None:
            parsed = parse_progress(line)
            if parsed:
                self.progress(*parsed)

        config_path, metrics_path = out_dir.resolve() / "train_config.json", out_dir.resolve() / "metrics.tmp.json"
        write_config(cfg, config_path)
        # Outside the temporary stage directory, which is deleted when the run fails.
        log_path = Path(rt.work_dir).resolve() / "logs" / f"TrainCAM-{self.key}.torchrun.log"
        self.progress(0, f"torchrun with {rt.train_processes} processes; log {log_path}")
        launch_torchrun(rt.train_processes, "stages.cam.train",
                        ["--config", config_path, "--manifest", self.input_dir("dataset").resolve(),
                         "--out", out_dir.resolve(), "--metrics", metrics_path, "--device", rt.device,
                         "--loader-workers", rt.loader_workers, "--threads", rt.torch_threads],
                        env=None, log_path=log_path, threads_per_process=rt.torch_threads,
                        on_line=forward_progress)
        metrics = read_json(metrics_path)
        metrics_path.unlink()
        self.progress(100, f"trained with {rt.train_processes} processes, final loss {metrics['final_loss']:.4f}")
        return metrics


@with_config(C.MakeCAMConfig)
class MakeCAM(ShardedStage):
    """Multi-scale CAMs for every training and evaluation image, computed in shards."""

    code = ("stages.cam.infer", "stages.cam.methods")
    shard_gpus = 1

    def code_roots(self) -> tuple[str, ...]:
        from stages.cam import CAM_METHODS
        return (*self.code, CAM_METHODS.module_of(self.stage(TrainCAM).cam_method))

    def upstream(self) -> dict[str, StageTask]:
        return {"dataset": self.stage(PrepareDataset), "cam_net": self.stage(TrainCAM)}

    def compute_shard(self, ids, out_dir, writer, manifest, progress) -> dict:
        from stages.cam.infer import make_cams
        from stages.cam.methods import load_cam_model

        train = self.upstream()["cam_net"]
        device = resolve_device(runtime().device)
        model = load_cam_model(train.config, manifest.label_space.num_classes - 1, train.stage_dir, device)
        make_cams(model, manifest, ids, writer, self.scales, self.flip, device, progress=progress)
        return {}


@with_config(C.EvalCAMConfig)
class EvalCAM(StageTask):
    """Score CAMs on the eval list: mIoU at the configured threshold and the whole threshold curve."""

    code = ("stages.cam.evaluate",)

    def upstream(self) -> dict[str, StageTask]:
        return {"dataset": self.stage(PrepareDataset), "cams": self.stage(MakeCAM)}

    def compute(self, out_dir: Path) -> dict:
        from stages.cam.evaluate import evaluate_cams
        result = evaluate_cams(self.config, manifest_of(self), shard_store(self.input_dir("cams")), out_dir,
                               progress=self.progress)
        logger.info("EvalCAM: mIoU %.2f at threshold %.2f (best %.2f at %.2f)", 100 * result["miou"],
                    self.bg_threshold, 100 * result["best_miou"], result["best_threshold"])
        return result


@with_config(C.ExtractSeedsConfig)
class ExtractSeeds(ShardedStage):
    """Confident seeds (palette PNGs, 255 = ignore) from the full-resolution CAMs."""

    code = ("stages.seeds.extract",)

    def code_roots(self) -> tuple[str, ...]:
        if self.supervision == "image":
            return self.code
        from stages.seeds import SUPERVISION_MODULES
        return (*self.code, SUPERVISION_MODULES.module_of(self.supervision))

    def upstream(self) -> dict[str, StageTask]:
        return {"dataset": self.stage(PrepareDataset), "cams": self.stage(MakeCAM)}

    def compute_shard(self, ids, out_dir, writer, manifest, progress) -> dict:
        from stages.seeds.extract import extract_seeds
        return extract_seeds(self.config, manifest, ids, shard_store(self.input_dir("cams")), out_dir, writer,
                             progress=progress)


@with_config(C.TrainAffinityConfig)
class TrainAffinity(TrainingStage):
    """Train the inter-pixel relation net (AffinityNet or IRNet) on the seeds of the training images."""

    code = ("stages.affinity.train",)
    gpus = 1

    def code_roots(self) -> tuple[str, ...]:
        from stages.affinity import AFFINITY_METHODS
        return (*self.code, AFFINITY_METHODS.module_of(self.affinity_method))

    def upstream(self) -> dict[str, StageTask]:
        return {"dataset": self.stage(PrepareDataset), "seeds": self.stage(ExtractSeeds),
                "cam_net": self.stage(TrainCAM),
                **pretraining_upstream(self)}

    def compute(self, out_dir: Path) -> dict:
        import torch

        from data.io import read_label_png
        from stages.affinity.train import train_affinity

        rt = runtime()
        manifest = manifest_of(self)
        seeds_dir = self.input_dir("seeds")
        scores = shard_store(seeds_dir)
        # Scribbles: the reference trains its affinity net on the CAM seeds with the scribbles on top, not on the
        # superpixel-grown scribbles the GNN learns from.
        affinity_seeds = seeds_dir / SCRIBBLE_AFFINITY

        def seed_label(image_id: str):
            if affinity_seeds.is_dir():
                return read_label_png(label_file(seeds_dir, image_id, folder=SCRIBBLE_AFFINITY),
                                      manifest.label_space)
            return read_label_png(label_file(seeds_dir, image_id), manifest.label_space)

        def seed_scores(image_id: str):
            if image_id not in scores:
                return None
            arrays, _ = scores.read(image_id, ["la", "ha"])
            return arrays["la"], arrays["ha"]

        cam_state = None
        if self.init_from_cam and not self.pretrained:
            cam_state = torch.load(self.input_dir("cam_net") / MODEL_WEIGHTS, map_location="cpu", weights_only=True)
        return train_affinity(with_weights_path(self), manifest, manifest.splits["train"], seed_label, seed_scores,
                              out_dir, resolve_device(rt.device), cam_backbone_state=cam_state,
                              loader_workers=rt.loader_workers, progress=self.progress, resume_dir=self.resume_dir,
                              supervision=self.upstream()["seeds"].supervision)

    def propagation_inputs(self, cfg: C.PropagateConfig, manifest, device):
        """``inputs(rgb, keys)`` of the trained net for Propagate, checked against the propagation it feeds."""
        from stages.affinity.train import affinity_net_inputs, load_affinity_model
        from stages.propagation.propagate import propagation_method, validate_propagation
        validate_propagation(cfg, affinity_method=self.affinity_method)
        model = load_affinity_model(self.run_config, self.stage_dir, device)
        return affinity_net_inputs(model, device, propagation_method(cfg.propagation).inputs.boundary_features)


@with_config(C.TrainSeedNetConfig)
class TrainSeedNet(TrainingStage):
    """DGCN / DSRG: a segmentation net trained from the seeds while they regrow (graph cut or region growing)
    every iteration; Propagate (``propagation = graphcut | dsrg``) predicts the pseudo labels with it."""

    code = ("stages.seed_net.train",)
    gpus = 1

    def code_roots(self) -> tuple[str, ...]:
        return (*self.code, segmenter_code(self.model))

    def upstream(self) -> dict[str, StageTask]:
        return {"dataset": self.stage(PrepareDataset), "seeds": self.stage(ExtractSeeds),
                **pretraining_upstream(self)}

    def compute(self, out_dir: Path) -> dict:
        from data.io import read_label_png
        from stages.seed_net.train import train_seed_net

        rt = runtime()
        manifest = manifest_of(self)
        seeds_dir = self.input_dir("seeds")

        def seed_label(image_id: str):
            return read_label_png(label_file(seeds_dir, image_id), manifest.label_space)
        return train_seed_net(with_weights_path(self), manifest, manifest.splits["train"], seed_label, out_dir,
                              resolve_device(rt.device), resume_dir=self.resume_dir, loader_workers=rt.loader_workers,
                              processes=rt.cut_processes, progress=self.progress)

    def propagation_inputs(self, cfg: C.PropagateConfig, manifest, device):
        """``inputs(rgb, keys)``: this net's multi-scale probabilities, checked against the propagation it feeds."""
        from stages.propagation.propagate import validate_propagation
        from stages.seed_net.train import load_seed_net, seed_net_inputs
        validate_propagation(cfg, seed_net_method=self.method)
        model = load_seed_net(self.run_config, manifest.label_space.num_classes, self.stage_dir, device)
        return seed_net_inputs(self.run_config, model, device)


@with_config(C.PropagateConfig)
class Propagate(ShardedStage):
    """Pseudo-label PNGs and class scores from the CAMs, the seeds and a trained net, by the chosen propagation
    method (``propagation``: a record of stages.propagation, which names the net it reads)."""

    code = ("stages.propagation.propagate",)
    shard_gpus = 1

    @property
    def method(self):
        """The chosen propagation method's record (stages.propagation)."""
        from stages.propagation import PROPAGATION_METHODS
        return PROPAGATION_METHODS.get(self.propagation, key="Propagate.propagation")

    @cached_property
    def trainer(self) -> StageTask:
        """The stage that trains the net this method reads: TrainAffinity or TrainSeedNet."""
        from stages.propagation.method import AFFINITY_NET
        return self.stage(TrainAffinity) if self.method.trained_by == AFFINITY_NET else self.stage(TrainSeedNet)

    def code_roots(self) -> tuple[str, ...]:
        """The step, the chosen method's module, and the trained net's modules, which load and run it here (the
        other methods' modules are not run, so they are not part of the key)."""
        from stages.propagation import PROPAGATION_METHODS
        return (*self.code, PROPAGATION_METHODS.module_of(self.propagation), *self.trainer.code_roots())

    def key_params(self, cfg) -> dict:
        """All knobs but other methods' own (``<method>_*``) and the shared ones this method does not read (a walk
        length under graph cut): tuning one method never recomputes another's labels."""
        from stages.propagation import PROPAGATION_METHODS
        others = [f"{name}_" for name in PROPAGATION_METHODS.names() if name != cfg.propagation]
        return {k: v for k, v in super().key_params(cfg).items() if not k.startswith(tuple(others))}

    def upstream(self) -> dict[str, StageTask]:
        trainer = self.trainer
        return {"dataset": self.stage(PrepareDataset), "cams": self.stage(MakeCAM), "seeds": self.stage(ExtractSeeds),
                ("affinity" if isinstance(trainer, TrainAffinity) else "seed_net"): trainer}

    def compute_shard(self, ids, out_dir, writer, manifest, progress) -> dict:
        from stages.propagation.propagate import propagate_images

        device = resolve_device(runtime().device)
        inputs = self.trainer.propagation_inputs(self.run_config, manifest, device)
        return propagate_images(self.run_config, manifest, ids, shard_store(self.input_dir("cams")),
                                self.input_dir("seeds"), inputs, out_dir, writer, device, progress=progress,
                                supervision=self.upstream()["seeds"].supervision)


@with_config(C.EvalPseudoLabelsConfig)
class EvalPseudoLabels(StageTask):
    """Score pseudo labels and seeds on the eval list; report CAM -> seeds -> pseudo-label mIoU."""

    code = ("stages.propagation.evaluate",)

    def upstream(self) -> dict[str, StageTask]:
        return {"dataset": self.stage(PrepareDataset), "cam_eval": self.stage(EvalCAM),
                "seeds": self.stage(ExtractSeeds), "labels": self.stage(Propagate), "refined": self.stage(RefineCRF)}

    def compute(self, out_dir: Path) -> dict:
        from stages.propagation.evaluate import evaluate_pseudo_labels

        def stage_metrics(name: str) -> dict:
            return read_json(self.input_dir(name) / PROVENANCE)["metrics"]

        upstream = {"cam": read_json(self.input_dir("cam_eval") / METRICS),
                    "seeds": stage_metrics("seeds"), "propagate": stage_metrics("labels")}
        result = evaluate_pseudo_labels(self.config, manifest_of(self), self.input_dir("labels"),
                                        self.input_dir("seeds"), upstream, out_dir, progress=self.progress,
                                        refined_dir=self.input_dir("refined"))
        chain = result["chain"]
        logger.info("EvalPseudoLabels: CAM %.2f -> seeds %.2f -> pseudo labels %.2f -> after the CRF %.2f mIoU",
                    100 * (chain["cam_miou"] or 0), 100 * (chain["seed_miou"] or 0), 100 * result["miou"],
                    100 * chain["refined_miou"])
        return result


@with_config(C.RefineCRFConfig)
class RefineCRF(ShardedStage):
    """Dense CRF on the propagated class scores: refined pseudo-label PNGs."""

    code = ("stages.refine.refine",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.crf_preset  # noqa: B018  (fails while scheduling when the method has no CRF of its own)

    @cached_property
    def crf_preset(self) -> str:
        """The preset applied: ``preset``, or with ``preset = method`` the propagation record's ``final_crf``."""
        if self.preset != C.METHOD_CRF:
            return self.preset
        method = self.stage(Propagate).method
        if not method.final_crf:
            raise ValueError(f"RefineCRF.preset = {C.METHOD_CRF}: propagation {method.name} has no final CRF of its "
                             "own in its reference code; name a preset of stages/refine/crf.py instead")
        return method.final_crf

    def upstream(self) -> dict[str, StageTask]:
        return {"dataset": self.stage(PrepareDataset), "labels": self.stage(Propagate)}

    def compute_shard(self, ids, out_dir, writer, manifest, progress) -> dict:
        from stages.refine.refine import refine_pseudo_labels
        rt = runtime()
        cfg = dataclasses.replace(self.config, preset=self.crf_preset)
        return refine_pseudo_labels(cfg, manifest, ids, shard_store(self.input_dir("labels")), out_dir,
                                    resolve_device(rt.device), progress=progress)

    def compute(self, out_dir: Path) -> dict:
        return {**super().compute(out_dir), "crf_preset": self.crf_preset}


LABEL_SOURCES = ("pseudo", "gt")


@with_config(C.TrainSegmentationConfig)
class TrainSegmentation(TrainingStage):
    """DeepLab trained on the pseudo labels, or (``--labels gt``) on GT: the fully supervised ceiling."""

    code = ("stages.segmentation.train",)
    gpus = 1
    labels = luigi.ChoiceParameter(choices=LABEL_SOURCES, default="pseudo")

    def code_roots(self) -> tuple[str, ...]:
        return (*self.code, segmenter_code(self.model))

    def fingerprint(self) -> dict:
        return {"labels": self.labels}

    def upstream(self) -> dict[str, StageTask]:
        up: dict[str, StageTask] = {"dataset": self.stage(PrepareDataset), **pretraining_upstream(self)}
        if self.labels == "pseudo":
            up["pseudo_labels"] = self.stage(Propagate) if self.pseudo_labels == "propagated" else self.stage(RefineCRF)
            if self.pseudo_labels == "agreed":
                up["propagated_labels"] = self.stage(Propagate)
        return up

    def compute(self, out_dir: Path) -> dict:
        from data.io import read_label_png
        from stages.segmentation.train import agreed_labels, train_segmentation

        rt = runtime()
        manifest = manifest_of(self)
        if self.labels == "gt":
            def label_of(image_id: str, shape: tuple[int, int]):
                return manifest.layout.read_label(image_id, shape=shape)
        else:
            dirs = [self.input_dir(name) for name in ("pseudo_labels", "propagated_labels") if name in self.upstream()]

            def label_of(image_id: str, shape: tuple[int, int]):
                maps = [read_label_png(label_file(d, image_id), manifest.label_space, shape=shape) for d in dirs]
                return agreed_labels(*maps) if len(maps) == 2 else maps[0]
        metrics = train_segmentation(with_weights_path(self), manifest, label_of, out_dir, resolve_device(rt.device),
                                     resume_dir=self.resume_dir, loader_workers=rt.loader_workers,
                                     progress=self.progress)
        return metrics


@with_config(C.EvalSegmentationConfig)
class EvalSegmentation(ShardedStage):
    """DeepLab predictions on the val list (palette PNGs) and their mIoU, with and without the test-time CRF."""

    code = ("stages.segmentation.predict",)

    def code_roots(self) -> tuple[str, ...]:
        return (*self.code, segmenter_code(self.upstream()["model"].model))
    shard_gpus = 1
    labels = luigi.ChoiceParameter(choices=LABEL_SOURCES, default="pseudo")
    variant_params = ("labels",)

    def fingerprint(self) -> dict:
        return {"labels": self.labels}

    def upstream(self) -> dict[str, StageTask]:
        return {"dataset": self.stage(PrepareDataset), "model": self.stage(TrainSegmentation, labels=self.labels)}

    def shard_members(self, manifest: Manifest) -> list[str]:
        return list(manifest.splits["val"])

    def compute_shard(self, ids, out_dir, writer, manifest, progress) -> dict:
        from stages.segmentation.model import load_segmenter
        from stages.segmentation.predict import predict_images

        trained = self.upstream()["model"]
        device = resolve_device(runtime().device)
        model = load_segmenter(trained.run_config, manifest.label_space.num_classes, trained.stage_dir, device)
        return predict_images(self.config, model, manifest, ids, out_dir, device, progress=progress)

    def summarise(self, shard_metrics: list[dict]) -> dict:
        import numpy as np
        total: dict = {}
        for name in ("confusion_raw", "confusion_crf"):
            parts = [np.asarray(m[name]) for m in shard_metrics if m.get(name) is not None]
            if parts:
                total[name] = sum(parts).tolist()
        return total

    def compute(self, out_dir: Path) -> dict:
        from stages.segmentation.predict import write_segmentation_metrics
        joined = super().compute(out_dir)
        metrics = write_segmentation_metrics(self.config, manifest_of(self).label_space, joined, out_dir,
                                             labels=self.labels)
        logger.info("EvalSegmentation (%s labels): val mIoU %.2f (%.2f before the CRF)", self.labels,
                    100 * metrics["miou"], 100 * metrics["miou_no_crf"])
        return metrics


OBJECT_MAP_SOURCES = ("gt", "supervised", "wsss", "none")


@with_config(C.MakeObjectMapsConfig)
class MakeObjectMaps(ShardedStage):
    """Per-image object softmax (train and val) that GMNet is conditioned on, from ``source``."""

    code = ("stages.parts.object_maps",)
    shard_gpus = 1
    source = luigi.ChoiceParameter(choices=OBJECT_MAP_SOURCES, default="gt")
    variant_params = ("source",)

    @property
    def stage_name(self) -> str:
        name = f"{self.get_task_family()}-{self.source}"
        return f"{name}@{self.variant}" if self.variant else name

    def fingerprint(self) -> dict:
        return {"source": self.source}

    def code_roots(self) -> tuple[str, ...]:
        trained = self.upstream().get("model")
        return (*self.code, segmenter_code(trained.model)) if trained else self.code

    def upstream(self) -> dict[str, StageTask]:
        up: dict[str, StageTask] = {"dataset": self.stage(PrepareDataset)}
        if self.source in ("supervised", "wsss"):
            up["model"] = self.stage(TrainSegmentation, labels="gt" if self.source == "supervised" else "pseudo")
        return up

    def shard_members(self, manifest: Manifest) -> list[str]:
        return list(dict.fromkeys(manifest.splits["train"] + manifest.splits["val"]))

    def compute_shard(self, ids, out_dir, writer, manifest, progress) -> dict:
        from stages.parts.object_maps import make_object_maps
        from stages.segmentation.model import load_segmenter

        device = resolve_device(runtime().device)
        trained = self.upstream().get("model")
        model = load_segmenter(trained.run_config, manifest.label_space.num_classes, trained.stage_dir, device) \
            if trained else None
        make_object_maps(self.source, model, manifest, ids, writer, device, self.scales, self.flip, progress)
        return {}


def object_maps_of(task: StageTask, manifest: Manifest, cond_source: str):
    """The object-map source (image id -> maps) of a part stage's upstream ``maps``, None without conditioning."""
    if cond_source == "none":
        return None
    from data.dense import stage_maps
    from stages.parts.object_maps import object_map_source
    return object_map_source(stage_maps(task.input_dir("maps")), manifest.label_space.num_classes)


@with_config(C.TrainPartSegmentationConfig)
class TrainPartSegmentation(TrainingStage):
    """GMNet: a part segmenter conditioned on object maps, trained with CE + aux + the graph-matching loss."""

    code = ("stages.parts.train", "stages.parts.graph_matching")
    gpus = 1

    def code_roots(self) -> tuple[str, ...]:
        from stages.parts import part_model
        return (*self.code, segmenter_code(part_model(self.cond_source)))

    def upstream(self) -> dict[str, StageTask]:
        up: dict[str, StageTask] = {"dataset": self.stage(PrepareDataset), **pretraining_upstream(self)}
        if self.cond_source != "none":
            up["maps"] = self.stage(MakeObjectMaps, source=self.cond_source)
        return up

    def compute(self, out_dir: Path) -> dict:
        from stages.parts.train import part_layout, train_parts

        rt = runtime()
        manifest = manifest_of(self)
        cfg = with_weights_path(self)
        return train_parts(cfg, manifest, part_layout(manifest, cfg), object_maps_of(self, manifest, self.cond_source),
                           out_dir, resolve_device(rt.device), resume_dir=self.resume_dir,
                           loader_workers=rt.loader_workers, progress=self.progress)


@with_config(C.EvalPartsConfig)
class EvalParts(ShardedStage):
    """The part segmenter on val: palette PNGs, part mIoU (GMNet's convention and more), adjacency error."""

    code = ("stages.parts.evaluate",)
    shard_gpus = 1

    def code_roots(self) -> tuple[str, ...]:
        from stages.parts import part_model
        return (*self.code, segmenter_code(part_model(self.stage(TrainPartSegmentation).cond_source)))

    def upstream(self) -> dict[str, StageTask]:
        train = self.stage(TrainPartSegmentation)
        up: dict[str, StageTask] = {"dataset": self.stage(PrepareDataset), "model": train}
        if train.cond_source != "none":
            up["maps"] = self.stage(MakeObjectMaps, source=train.cond_source)
        return up

    def shard_members(self, manifest: Manifest) -> list[str]:
        return list(manifest.splits["val"])

    def compute_shard(self, ids, out_dir, writer, manifest, progress) -> dict:
        from stages.parts.evaluate import evaluate_part_images
        from stages.parts.train import load_part_model, part_layout

        train = self.upstream()["model"]
        device = resolve_device(runtime().device)
        layout = part_layout(manifest, train.config)
        model = load_part_model(train.config, layout.space, train.stage_dir, device)
        maps = object_maps_of(self, manifest, train.cond_source)
        return evaluate_part_images(model, manifest, layout, maps, ids, out_dir, device, self.flip,
                                    train.gm_dilation, train.gm_valid, progress)

    def summarise(self, shard_metrics: list[dict]) -> dict:
        from stages.parts.evaluate import summarise_parts
        from stages.parts.train import part_layout

        train = self.upstream()["model"]
        space = part_layout(manifest_of(self), train.config).space
        return summarise_parts(shard_metrics, space, self.unidentifiable)

    def compute(self, out_dir: Path) -> dict:
        """Every metric into ``metrics.json``; the scalars (not the confusion matrix or lists) into provenance."""
        from data.io import write_json
        metrics = super().compute(out_dir)
        train = self.upstream()["model"]
        write_json(out_dir / METRICS, {"cond_source": train.cond_source, "gm_mode": train.gm_mode, **metrics})
        logger.info("EvalParts (objects: %s, GM %s): val part mIoU %.2f, adjacency error %.4f", train.cond_source,
                    train.gm_mode, 100 * (metrics["miou"] or 0), metrics["adjacency_error"])
        return {k: v for k, v in metrics.items() if not isinstance(v, list)}


@with_config(C.ReportConfig)
class Report(StageTask):
    """The run report: one self-contained HTML file and a Markdown summary of every stage."""

    code = ("stages.report.html", "stages.report.build")

    def code_roots(self) -> tuple[str, ...]:
        return (*self.code, segmenter_code(self.upstream()["segmenter"].model))  # the gallery's predictions

    @cached_property
    def comparisons(self) -> list[Comparison]:
        """``compare``'s entries with the overrides each runs (pipeline.variants)."""
        return [comparison(spec) for spec in self.compare]

    @cached_property
    def part_runs(self) -> list[PartRun]:
        """``parts_compare``'s entries with the overrides each runs (pipeline.variants.part_run)."""
        return [part_run(spec) for spec in self.parts_compare]

    def upstream(self) -> dict[str, StageTask]:
        compared: dict[str, StageTask] = {}
        for entry in self.comparisons:
            compared[f"compare:{entry.spec}"] = stage_in_variant(EvalPseudoLabels, entry.overrides)
            if self.compare_segmentation:
                compared[f"compare-deeplab:{entry.spec}"] = stage_in_variant(EvalSegmentation, entry.overrides)
        for run in self.part_runs:
            compared[f"parts:{run.spec}"] = stage_in_variant(EvalParts, run.overrides)
        for spec in self.compare_segmenters:
            for labels in LABEL_SOURCES:
                compared[f"segmenter:{spec}:{labels}"] = stage_in_variant(
                    EvalSegmentation, {"TrainSegmentation": segmenter_overrides(spec)}, labels=labels)
        return {"dataset": PrepareDataset(), "cam_eval": EvalCAM(), "cams": MakeCAM(), "seeds": ExtractSeeds(),
                "labels": Propagate(), "refined": RefineCRF(), "pseudo_eval": EvalPseudoLabels(),
                "segmenter": TrainSegmentation(), "segmentation": EvalSegmentation(),
                "ceiling_segmenter": TrainSegmentation(labels="gt"),
                "ceiling": EvalSegmentation(labels="gt"), **compared}

    def segmenter_comparison(self) -> list[dict]:
        """One row per (segmenter, labels), the main segmenter's first: val mIoU without and with the dense CRF."""
        if not self.compare_segmenters:
            return []
        upstream = self.upstream()
        evaluations = [(f"{upstream['segmenter'].model} (main chain)", labels,
                        upstream["segmentation" if labels == "pseudo" else "ceiling"]) for labels in LABEL_SOURCES]
        evaluations += [(spec, labels, upstream[f"segmenter:{spec}:{labels}"])
                        for spec in self.compare_segmenters for labels in LABEL_SOURCES]
        rows = []
        for model, labels, evaluation in evaluations:
            metrics = read_json(evaluation.stage_dir / METRICS)
            trainer = evaluation.upstream()["model"]
            rows.append({"model": model, "labels": labels, "miou_no_crf": metrics["miou_no_crf"],
                         "miou_crf": metrics["miou"] if metrics.get("crf") else None,
                         "train_seconds": read_json(trainer.stage_dir / PROVENANCE)["seconds"]})
        return rows

    def comparison(self) -> list[dict]:
        """One row per method, the main chain's first, then ``compare``'s: the recipe it ran, its mIoU from the CAM
        to DeepLab on its labels, and compute times."""
        from pipeline.presets import describe, loaded_files
        upstream = self.upstream()
        presets = [p for p in loaded_files() if p.resolve() != PROJECT_CFG]
        entries = [Comparison("", describe(presets[-1]) if presets else "defaults", {}), *self.comparisons]
        ceiling = read_json(upstream["ceiling"].stage_dir / METRICS).get("miou")
        rows = []
        for entry in entries:
            spec = entry.spec
            evaluation = upstream[f"compare:{spec}" if spec else "pseudo_eval"]
            chain = evaluation.upstream()
            propagate, seeds = chain["labels"], chain["seeds"]
            trainer = propagate.trainer
            records = {name: read_json(task.stage_dir / PROVENANCE) for name, task in
                       (("trainer", trainer), ("propagate", propagate), ("crf", chain["refined"]))}
            deeplab = upstream.get(f"compare-deeplab:{spec}" if spec else "segmentation")
            deeplab_miou = read_json(deeplab.stage_dir / METRICS).get("miou") if deeplab else None
            rows.append({"method": spec or f"{propagate.propagation}/{seeds.supervision} (main chain)",
                         "recipe": entry.recipe or "main chain's seeds", "crf_preset": chain["refined"].crf_preset,
                         "trainer": trainer.stage_name, **read_json(evaluation.stage_dir / METRICS)["chain"],
                         "deeplab_miou": deeplab_miou, "ceiling_miou": ceiling,
                         "train_seconds": records["trainer"]["seconds"],
                         # summed over shards: the compute time whatever the number of workers
                         "propagate_seconds": records["propagate"]["metrics"].get("shard_seconds"),
                         "crf_seconds": records["crf"]["metrics"].get("shard_seconds"),
                         "propagated_images": records["propagate"]["metrics"].get("images")})
        return rows

    def part_comparison(self) -> list[dict]:
        """One row per ``parts_compare`` entry: what it trained with, its EvalParts metrics and directories."""
        rows = []
        upstream = self.upstream()
        for run in self.part_runs:
            evaluation = upstream[f"parts:{run.spec}"]
            chain = evaluation.upstream()
            train = chain["model"]
            rows.append({"entry": run.spec, "cond_source": train.cond_source, "gm_mode": train.gm_mode,
                         "gm_lambda": train.gm_lambda,
                         "train_seconds": read_json(train.stage_dir / PROVENANCE)["seconds"],
                         "eval_dir": evaluation.stage_dir,
                         "maps_dir": chain["maps"].stage_dir if "maps" in chain else None,
                         "metrics": read_json(evaluation.stage_dir / METRICS)})
        return rows

    def compute(self, out_dir: Path) -> dict:
        from stages.report.build import build_report
        graph = stage_graph()
        upstream = self.upstream()
        parts = self.part_comparison()
        layout = None
        if parts:  # the runs differ only in conditioning and GM: one part space
            from stages.parts.train import part_layout
            trained = upstream[f"parts:{self.part_runs[0].spec}"].upstream()["model"]
            layout = part_layout(manifest_of(self), trained.config)
        dirs = {name: task.stage_dir for name, task in upstream.items()}
        config = {family: task.params_dict for family, task in graph.items()}
        provenance = {family: read_json(task.stage_dir / PROVENANCE) for family, task in graph.items()
                      if task.stage_dir != self.stage_dir and (task.stage_dir / PROVENANCE).is_file()}
        return build_report(self.config, manifest_of(self), dirs, config, provenance,
                            segmenter_config=upstream["segmenter"].run_config,
                            eval_config=upstream["segmentation"].config, device=resolve_device(runtime().device),
                            out_dir=out_dir, comparison=self.comparison(), parts=parts,
                            part_layout=layout, segmenters=self.segmenter_comparison(),
                            trained={name: task.stage_dir for name, task in graph.items()
                                     if "@" not in name and (task.stage_dir / TRAINING_LOG).is_file()})


class FullWSSS(luigi.WrapperTask):
    """The whole chain: CAM -> seeds -> affinity net -> propagation -> CRF -> DeepLab -> evaluation -> report;
    with ``parts = true`` also GMNet's part branch (MakeObjectMaps -> TrainPartSegmentation -> EvalParts)."""

    parts = luigi.BoolParameter(default=False, description="also GMNet's part branch (MakeObjectMaps -> "
                                "TrainPartSegmentation -> EvalParts)")

    def requires(self):
        return self.requires_stages()

    def requires_stages(self) -> list[StageTask]:
        return [Report(), EvalParts()] if self.parts else [Report()]


def segmenter_code(model: str) -> str:
    """The module of segmentation model ``model`` (``models.segmenters``): a stage that builds it runs it."""
    from models.segmenters import SEGMENTERS
    return SEGMENTERS.module_of(model, "model")


# Order matters for status/clean: upstream first.
STAGES: tuple[type[StageTask], ...] = (PrepareDataset, PretrainBackbone, TrainCAM, MakeCAM, EvalCAM, ExtractSeeds,
                                       TrainAffinity, TrainSeedNet, Propagate, RefineCRF, EvalPseudoLabels,
                                       TrainSegmentation, EvalSegmentation, MakeObjectMaps, TrainPartSegmentation,
                                       EvalParts, Report)


def stage_graph(roots: Sequence[luigi.Task] = ()) -> dict[str, StageTask]:
    """The stages ``roots`` run (by default the current configuration's FullWSSS), upstream first, by stage name."""
    used: dict[str, StageTask] = {}
    pending = [task for root in (roots or [FullWSSS()])
               for task in (root.requires_stages() if isinstance(root, FullWSSS) else [root])]
    while pending:
        task = pending.pop()
        if task.stage_name not in used:
            used[task.stage_name] = task
            pending.extend(task.upstream().values())
    order = {cls.get_task_family(): i for i, cls in enumerate(STAGES)}
    names = sorted(used, key=lambda name: (order[used[name].get_task_family()], name))
    return {name: used[name] for name in names}


def downstream_of(name: str) -> list[str]:
    graph = stage_graph()
    hit = {name}
    for other, task in graph.items():  # upstream first
        if any(up.stage_name in hit for up in task.upstream().values()):
            hit.add(other)
    return [other for other in graph if other in hit]

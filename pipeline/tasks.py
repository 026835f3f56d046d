"""Luigi tasks: thin wrappers that key, place and publish what the ``stages`` library computes.

Each stage writes under ``<work_dir>/<Stage>/<key>/``. The key hashes the stage's parameters, its code
and its inputs' keys (pipeline.hashing), so an edit or a config change gives a new directory and Luigi
recomputes exactly the affected stages; reverting finds the old directory again. A stage directory is
built as a temporary sibling and renamed into place when complete, with ``provenance.json`` inside:
a directory that exists is a finished artifact.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import luigi

from data.io import atomic_path, read_json, remove_path, write_json
from data.manifest import Manifest
from pipeline import hashing
from pipeline.devices import assigned_gpus, will_use_cuda
from pipeline.submit import run_as_job  # also registers [submitit] for --submitit-* on the command line
from stages import config as C
from stages.runtime import configure_threads, resolve_device, versions

if TYPE_CHECKING:
    from data.dense import DenseMapWriter

logger = logging.getLogger("luigi-interface")
PROVENANCE = "provenance.json"
PARTS_SUFFIX = ".parts"
RESUME_SUFFIX = ".resume"   # training checkpoints of an unfinished stage, next to its directory


class wsss(luigi.Config):  # noqa: N801 - the section is called [wsss]
    """Runtime settings (never part of a key); fields mirror stages.config.RuntimeConfig."""

    work_dir = luigi.Parameter(default=C.RuntimeConfig.work_dir)
    device = luigi.Parameter(default=C.RuntimeConfig.device)
    loader_workers = luigi.IntParameter(default=C.RuntimeConfig.loader_workers)
    torch_threads = luigi.IntParameter(default=C.RuntimeConfig.torch_threads)
    train_processes = luigi.IntParameter(default=C.RuntimeConfig.train_processes)
    gpus = luigi.Parameter(default=C.RuntimeConfig.gpus)
    gpu_lock_dir = luigi.Parameter(default=C.RuntimeConfig.gpu_lock_dir)
    gpu_wait_s = luigi.FloatParameter(default=C.RuntimeConfig.gpu_wait_s)
    submit_stages = luigi.Parameter(default=C.RuntimeConfig.submit_stages)
    crf_backend = luigi.Parameter(default=C.RuntimeConfig.crf_backend)
    cut_processes = luigi.IntParameter(default=C.RuntimeConfig.cut_processes)


def runtime() -> C.RuntimeConfig:
    section = wsss()
    return C.RuntimeConfig(**{f.name: getattr(section, f.name) for f in dataclasses.fields(C.RuntimeConfig)})


def _parameter_for(default: object) -> luigi.Parameter:
    if isinstance(default, bool):
        return luigi.BoolParameter(default=default, parsing=luigi.BoolParameter.EXPLICIT_PARSING)
    if isinstance(default, int):
        return luigi.IntParameter(default=default)
    if isinstance(default, float):
        return luigi.FloatParameter(default=default)
    if isinstance(default, tuple):
        return luigi.TupleParameter(default=default)
    return luigi.Parameter(default=default)


def with_config(config_class: type):
    """Give a task one Luigi parameter per field of a stages.config dataclass."""
    def decorate(task_class: type) -> type:
        task_class.config_class = config_class
        for f in dataclasses.fields(config_class):
            param = _parameter_for(f.default)
            setattr(task_class, f.name, param)
            param.__set_name__(task_class, f.name)  # what class creation does for declared attributes
        return task_class
    return decorate


class StageTarget(luigi.Target):
    """A stage directory; it exists only once renamed into place with its provenance inside."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def exists(self) -> bool:
        return (self.path / PROVENANCE).is_file()


class ShardTarget(luigi.Target):
    """A finished shard: its directory waiting in ``<key>.parts/``, or its marker published in ``<key>/``."""

    def __init__(self, final: Path, part: Path):
        self.final, self.part = final, part

    def exists(self) -> bool:
        return self.final.is_file() or self.part.is_dir()


class StageTask(luigi.Task):
    """Base of every stage: key, directory, atomic publication and provenance."""

    config_class: type | None = None
    code: tuple[str, ...] = ()     # library modules this stage runs (their imports are followed)
    gpus = 0                       # CUDA devices compute() uses when it runs on CUDA (see `resources`)
    accepts_messages = False
    # A compared method's chain (Report.compare; stages.config.variant_overrides): per task family the parameters
    # it overrides, and its name, which lists those overrides that reach this task (see `stage_in_variant`), so
    # one name is one computation. The overridden parameters themselves enter the key.
    variant = luigi.Parameter(default="")
    overrides = luigi.DictParameter(default={}, significant=False)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.config_class is not None:
            # Fail while scheduling, naming the key, rather than hours later inside the stage.
            C.validate(self.config)

    # -- identity
    @property
    def config(self):
        if self.config_class is None:
            return None
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self.config_class)}
        return self.config_class(**{k: _plain(v) for k, v in values.items()})

    def upstream(self) -> dict[str, StageTask]:
        """Stages whose artifacts this one reads (their keys enter this key)."""
        return {}

    def stage(self, cls: type[StageTask], **params) -> StageTask:
        """Upstream stage ``cls`` in this task's variant."""
        return stage_in_variant(cls, self.overrides, **params)

    @cached_property
    def upstream_families(self) -> frozenset[str]:
        """This task's family and those of everything upstream of it."""
        families = {self.get_task_family()}
        for task in self.upstream().values():
            families |= task.upstream_families
        return frozenset(families)

    @property
    def stage_name(self) -> str:
        """The family, plus what tells apart a further instance of it in one run (``TrainSegmentation-gt``, the
        ceiling; ``Propagate@gcn``, a compared method)."""
        labels = getattr(self, "labels", "pseudo")
        name = self.get_task_family() if labels == "pseudo" else f"{self.get_task_family()}-{labels}"
        return f"{name}@{self.variant}" if self.variant else name

    def requires(self):
        return self.upstream()

    def fingerprint(self) -> dict:
        """Extra identity beyond parameters and code (e.g. the content of external id lists)."""
        return {}

    @cached_property
    def code_modules(self) -> dict[str, str]:
        return hashing.module_closure(self.code)

    @cached_property
    def params_dict(self) -> dict:
        cfg = self.config
        # A config may leave out knobs its stage does not read in this configuration (PropagateConfig.key_params).
        params = {} if cfg is None else cfg.key_params() if hasattr(cfg, "key_params") else dataclasses.asdict(cfg)
        params.update(self.fingerprint())
        return params

    @cached_property
    def key(self) -> str:
        inputs = {name: task.key for name, task in self.upstream().items()}
        return hashing.stage_key(self.get_task_family(), self.params_dict, self.code_modules, inputs)

    @property
    def stage_dir(self) -> Path:
        return Path(runtime().work_dir) / self.get_task_family() / self.key

    def output(self) -> StageTarget:
        return StageTarget(self.stage_dir)

    # -- running
    def input_dir(self, name: str) -> Path:
        return self.upstream()[name].stage_dir

    def progress(self, percent: float, message: str) -> None:
        report_progress(self, percent, message)

    def compute(self, out_dir: Path) -> dict:
        raise NotImplementedError

    @property
    def resources(self) -> dict[str, int]:
        return gpu_resources(self)

    def run(self) -> None:
        rt = runtime()
        configure_threads(rt.torch_threads)
        from stages.crf import set_default_backend  # lazily: stages.crf is only needed by CRF stages
        set_default_backend(rt.crf_backend)
        started = time.time()
        with atomic_path(self.stage_dir, directory=True) as tmp:
            metrics, placement = run_compute(self, tmp)
            write_json(tmp / PROVENANCE, self.provenance(started, metrics) | placement)
        logger.info("%s done in %.1f s -> %s", self.get_task_family(), time.time() - started, self.stage_dir)

    def provenance(self, started: float, metrics: dict) -> dict:
        return {
            "stage": self.get_task_family(), "key": self.key, "params": self.params_dict,
            "code": self.code_modules, "code_digest": hashing.code_digest(self.code_modules),
            "inputs": {name: {"stage": t.get_task_family(), "key": t.key}
                       for name, t in self.upstream().items()},
            "seed": self.params_dict.get("seed"), "versions": versions(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "seconds": round(time.time() - started, 3), "metrics": metrics,
        }


def stage_in_variant(cls: type[StageTask], overrides, **params) -> StageTask:
    """Stage ``cls`` with ``overrides`` ({family: {parameter: value}}) applied to it and upstream of it.

    The plain stage when they change nothing; else a task whose variant names exactly the overrides that reach it,
    so two compared methods sharing a stage (the same box seeds, say) share one task and one directory.
    """
    plain = cls(**params)
    if not overrides:
        return plain
    own = dict(overrides.get(cls.get_task_family(), {}))
    probe = cls(**{**params, **own}, overrides=overrides)
    if probe.key == plain.key:
        return plain
    reaching = {family: dict(overrides[family]) for family in sorted(probe.upstream_families) if family in overrides}
    name = ",".join(f"{k}={v}" for values in reaching.values() for k, v in sorted(values.items()))
    return cls(**{**params, **own}, variant=name, overrides=reaching)


def submitted_families(rt: C.RuntimeConfig) -> set[str]:
    """``[wsss] submit_stages`` as a set of task families, each checked to exist."""
    families = {name.strip() for name in rt.submit_stages.split(",") if name.strip()}
    for family in families:
        try:
            luigi.task_register.Register.get_task_cls(family)
        except luigi.task_register.TaskClassException as exc:
            raise ValueError(f"[wsss] submit_stages names {family!r}, which is not a task family") from exc
    return families


def gpu_resources(task: StageTask | ShardTask) -> dict[str, int]:
    """Luigi's ``gpu`` counter for a run on this host: none on a CPU-only host, for CPU stages, or for jobs.

    Decided from the configuration, ``CUDA_VISIBLE_DEVICES`` and ``nvidia-smi``: the scheduling process
    never initialises CUDA (it forks the task processes).
    """
    rt = runtime()
    if not task.gpus or task.get_task_family() in submitted_families(rt) or not will_use_cuda(rt.device, rt.gpus):
        return {}
    return {"gpu": task.gpus}


def run_compute(task: StageTask | ShardTask, out_dir: Path) -> tuple[dict, dict]:
    """``task.compute(out_dir)`` here on the task's own devices, or as a submitit job (``[wsss] submit_stages``).

    Returns the metrics and what to record about where it ran (devices, or the job).
    """
    rt = runtime()
    if task.get_task_family() in submitted_families(rt):
        return run_as_job(task, out_dir)
    n_gpus = task.resources.get("gpu", 0)
    if n_gpus and not rt.device.startswith("cuda:"):  # an explicit cuda:N means the user placed it
        with assigned_gpus(n_gpus, rt.gpus, rt.gpu_lock_dir, rt.gpu_wait_s) as allocation:
            logger.info("%s: on GPU %s", task.get_task_family(), allocation.visible_devices)
            return task.compute(out_dir) or {}, {"gpus": allocation.devices}
    return task.compute(out_dir) or {}, {}


def report_progress(task: luigi.Task, percent: float, message: str) -> None:
    """Forward progress to the scheduler (shown by luigid) and to the log."""
    task.set_progress_percentage(int(percent))
    task.set_status_message(message)
    logger.info("%s: %s", task.get_task_family(), message)


def _plain(value: object) -> object:
    """Luigi freezes tuples of lists; stages want plain tuples."""
    if isinstance(value, (tuple, list)):
        return tuple(_plain(v) for v in value)
    return value


# --------------------------------------------------------------------------------------------- stages

@with_config(C.DatasetConfig)
class PrepareDataset(StageTask):
    """Materialise the embedded dataset, or check a VOC-layout one; write the manifest."""

    code = ("stages.dataset",)

    def fingerprint(self) -> dict:
        from stages.dataset import input_fingerprint
        fp = input_fingerprint(self.config)
        return {"external_lists": fp} if fp else {}

    def compute(self, out_dir: Path) -> dict:
        from stages.dataset import prepare_dataset
        manifest = prepare_dataset(self.config, out_dir, processes=max(1, os.cpu_count() or 1),
                                   log=lambda m: logger.warning("PrepareDataset: %s", m))
        return {"n_" + s: len(ids) for s, ids in manifest.splits.items()} | {
            "quarantined": len(manifest.quarantine)}


def manifest_of(task: StageTask) -> Manifest:
    return Manifest.load(task.input_dir("dataset"))


@with_config(C.PretrainBackboneConfig)
class PretrainBackbone(StageTask):
    """Synthetic stand-in for ImageNet weights; used by stages whose ``pretrained`` is ``synthetic``."""

    code = ("stages.pretrain",)
    gpus = 1

    def compute(self, out_dir: Path) -> dict:
        from stages.pretrain import pretrain_backbone
        rt = runtime()
        return pretrain_backbone(self.config, out_dir, resolve_device(rt.device),
                                 loader_workers=rt.loader_workers, progress=self.progress)


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
    cfg = task.config
    if cfg.pretrained != C.SYNTHETIC_PRETRAINING:
        return cfg
    from stages.pretrain import WEIGHTS
    return dataclasses.replace(cfg, pretrained=str(task.input_dir("pretrained") / WEIGHTS))


@with_config(C.TrainCAMConfig)
class TrainCAM(StageTask):
    """Train the CAM classification network."""

    code = ("stages.train_cam",)

    @property
    def gpus(self) -> int:
        return runtime().train_processes  # one device per DDP rank when on CUDA

    def upstream(self) -> dict[str, StageTask]:
        return {"dataset": self.stage(PrepareDataset), **pretraining_upstream(self)}

    def compute(self, out_dir: Path) -> dict:
        from stages.train_cam import check_divisible, train_cam
        rt = runtime()
        check_divisible(self.batch_size, rt.train_processes)  # before any process starts
        cfg = with_weights_path(self)
        if rt.train_processes == 1:
            return train_cam(cfg, manifest_of(self), out_dir, resolve_device(rt.device),
                             loader_workers=rt.loader_workers, progress=self.progress)
        # DDP: a fresh interpreter per rank under torchrun (CUDA cannot live in Luigi's forked workers).
        from stages.distributed import launch_torchrun
        from stages.train_cam import parse_progress, write_config

        def forward_progress(line: str) -> None:
            parsed = parse_progress(line)
            if parsed:
                self.progress(*parsed)

        config_path, metrics_path = out_dir.resolve() / "train_config.json", out_dir.resolve() / "metrics.tmp.json"
        write_config(cfg, config_path)
        # Outside the temporary stage directory, which is deleted when the run fails.
        log_path = Path(rt.work_dir).resolve() / "logs" / f"TrainCAM-{self.key}.torchrun.log"
        self.progress(0, f"torchrun with {rt.train_processes} processes; log {log_path}")
        launch_torchrun(rt.train_processes, "stages.train_cam",
                        ["--config", config_path, "--manifest", self.input_dir("dataset").resolve(),
                         "--out", out_dir.resolve(), "--metrics", metrics_path, "--device", rt.device,
                         "--loader-workers", rt.loader_workers, "--threads", rt.torch_threads],
                        env=None, log_path=log_path, threads_per_process=rt.torch_threads,
                        on_line=forward_progress)
        metrics = read_json(metrics_path)
        metrics_path.unlink()
        self.progress(100, f"trained with {rt.train_processes} processes, final loss {metrics['final_loss']:.4f}")
        return metrics


def shard_ids(ids: list[str], shard_size: int) -> list[list[str]]:
    """Deterministic shard membership: consecutive runs of the (ordered) id list."""
    return [ids[i:i + shard_size] for i in range(0, len(ids), shard_size)]


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}"


class ShardedStage(StageTask):
    """A per-image stage computed as independent shard tasks, then joined into one directory.

    Each shard writes ``<key>.parts/<shard>/`` atomically: a ``<shard>.h5`` of dense maps, per-image
    files (e.g. ``labels/<id>.png``) and ``<shard>.json`` with its metrics. Shards run in parallel on as
    many workers as Luigi has; a killed shard leaves only finished shards behind. The join hard-links
    every shard's files into ``<key>/`` (same relative paths), so nothing is copied, and writes
    ``index.json`` mapping each image to its shard file.
    """

    shard_task: type[ShardTask]
    variant_params: tuple[str, ...] = ()   # the stage's Luigi parameters outside its config (passed to shards)

    def shard_members(self, manifest: Manifest) -> list[str]:
        """Images this stage processes: train and eval (seeds, pseudo labels and CAMs are needed for both)."""
        return list(dict.fromkeys(manifest.splits["train"] + manifest.splits["eval"]))

    def shards(self, manifest: Manifest | None = None) -> list[list[str]]:
        return shard_ids(self.shard_members(manifest or manifest_of(self)), self.shard_size)

    @property
    def parts_dir(self) -> Path:
        return self.stage_dir.with_name(self.key + PARTS_SUFFIX)

    def shard_tasks(self) -> list[ShardTask]:
        shards = self.shards()
        extra = {name: getattr(self, name) for name in self.variant_params}
        if self.variant:
            extra.update(self.overrides.get(self.get_task_family(), {}), variant=self.variant,
                         overrides=self.overrides)
        return [self.shard_task(shard=i, n_shards=len(shards), stage_key=self.key, parent_params=extra)
                for i in range(len(shards))]

    @cached_property
    def static_shards(self) -> list[ShardTask]:
        # Decided once per instance, at scheduling time: luigi checks at run time that requires() is complete,
        # and the manifest appearing in between must not add shards to it.
        return self.shard_tasks() if self.upstream()["dataset"].complete() else []

    def requires(self):
        # Static shard dependencies whenever the manifest exists while scheduling: with luigid every worker then
        # sees (and can take) every shard. Dynamic ones (yielded by run) are visible only to the parent's worker.
        upstream = self.upstream()
        return {**upstream, "shards": self.static_shards} if self.static_shards else upstream

    def run(self):
        # Dynamic dependencies when the manifest did not exist at scheduling time (else already complete: no-op).
        yield self.shard_tasks()
        super().run()
        remove_path(self.parts_dir)  # only now: the published directory holds every shard

    def compute(self, out_dir: Path) -> dict:
        shards = self.shards()
        index, shard_metrics, shard_seconds = {}, [], 0.0
        for i, members in enumerate(shards):
            name = shard_name(i, len(shards))
            source = self.parts_dir / name
            for path in sorted(source.rglob("*")):
                target = out_dir / path.relative_to(source)
                if path.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                else:
                    # Link, not move: if publishing fails, the computed shards stay where they were.
                    os.link(path, target)
            record = read_json(source / f"{name}.json")
            shard_metrics.append(record["metrics"])
            shard_seconds += record["seconds"]
            index.update({image_id: f"{name}.h5" for image_id in members})
        names = [shard_name(i, len(shards)) + ".h5" for i in range(len(shards))]
        write_json(out_dir / "index.json", {"shards": names, "images": index})
        # The join itself takes no time: report the shards' compute time (summed over workers).
        return {"images": len(index), "shards": len(shards), "shard_seconds": round(shard_seconds, 1),
                **self.summarise(shard_metrics)}

    def summarise(self, shard_metrics: list[dict]) -> dict:
        """Stage metrics from the shards' metrics (default: sum the numbers, concatenate the lists)."""
        total: dict = {}
        for metrics in shard_metrics:
            for k, v in metrics.items():
                if isinstance(v, list):
                    total[k] = total.get(k, []) + v
                elif isinstance(v, (int, float)) and not isinstance(v, bool):
                    total[k] = total.get(k, 0) + v
        return total

    def compute_shard(self, ids: list[str], out_dir: Path, writer: DenseMapWriter, manifest: Manifest,
                      progress: Callable[[float, str], None]) -> dict:
        """Process ``ids``: per-image files into ``out_dir``, dense maps through ``writer``. Returns metrics."""
        raise NotImplementedError


class ShardTask(luigi.Task):
    """One shard of a :class:`ShardedStage`; its identity is the parent's key plus the shard index."""

    shard = luigi.IntParameter()
    n_shards = luigi.IntParameter()
    # The parent's key in the task id: one long-lived luigid serving several configurations must not take
    # shard 0 of one for shard 0 of another.
    stage_key = luigi.Parameter()
    # Parameters of the parent beyond its config (e.g. EvalSegmentation's ``labels``); the key covers them.
    parent_params = luigi.DictParameter(default={}, significant=False)
    parent_class: type[ShardedStage]
    gpus = 0                       # as StageTask.gpus, for one shard

    @cached_property
    def parent(self) -> ShardedStage:
        parent = self.parent_class(**dict(self.parent_params))
        if parent.key != self.stage_key:
            raise RuntimeError(f"{self.get_task_family()} of stage key {self.stage_key} runs under a configuration "
                               f"whose {parent.get_task_family()} key is {parent.key}")
        return parent

    @property
    def name(self) -> str:
        return shard_name(self.shard, self.n_shards)

    def requires(self):
        return self.parent.upstream()

    def output(self) -> ShardTarget:
        return ShardTarget(self.parent.stage_dir / f"{self.name}.json", self.parent.parts_dir / self.name)

    @property
    def resources(self) -> dict[str, int]:
        return gpu_resources(self)

    def members(self, manifest: Manifest | None = None) -> list[str]:
        shards = self.parent.shards(manifest)
        if len(shards) != self.n_shards:
            raise RuntimeError(f"{self.parent.get_task_family()}: expected {self.n_shards} shards, "
                               f"the manifest gives {len(shards)}")
        return shards[self.shard]

    def run(self) -> None:
        rt = runtime()
        configure_threads(rt.torch_threads)
        from stages.crf import set_default_backend  # lazily: stages.crf is only needed by CRF stages
        set_default_backend(rt.crf_backend)
        parent = self.parent
        members = self.members()
        started = time.time()
        with atomic_path(self.output().part, directory=True) as tmp:
            metrics, placement = run_compute(self, tmp)
            write_json(tmp / f"{self.name}.json", {"stage": parent.get_task_family(), "key": parent.key,
                                                   "shard": self.shard, "images": members,
                                                   "seconds": round(time.time() - started, 3),
                                                   "metrics": metrics, **placement})

    def compute(self, out_dir: Path) -> dict:
        """The shard's dense maps into ``<shard>.h5`` and its per-image files into ``out_dir``; returns metrics."""
        from data.dense import DenseMapWriter  # h5py stays out of the scheduler's start-up

        parent = self.parent
        manifest = manifest_of(parent)
        attrs = {"stage": parent.get_task_family(), "key": parent.key, "shard": self.shard}
        with DenseMapWriter(out_dir / f"{self.name}.h5", attrs) as writer:
            return parent.compute_shard(self.members(manifest), out_dir, writer, manifest,
                                        lambda p, m: report_progress(self, p, m)) or {}


def shard_store(stage_dir: Path):
    """Reader over the dense maps of a published sharded stage."""
    from data.dense import stage_maps  # h5py stays out of the scheduler's start-up
    return stage_maps(stage_dir)


@with_config(C.MakeCAMConfig)
class MakeCAM(ShardedStage):
    """Multi-scale CAMs for every training and evaluation image, computed in shards."""

    code = ("stages.make_cam", "stages.cam_methods")

    def upstream(self) -> dict[str, StageTask]:
        return {"dataset": self.stage(PrepareDataset), "cam_net": self.stage(TrainCAM)}

    def compute_shard(self, ids, out_dir, writer, manifest, progress) -> dict:
        from stages.cam_methods import load_cam_model
        from stages.make_cam import make_cams

        train = self.upstream()["cam_net"]
        device = resolve_device(runtime().device)
        model = load_cam_model(train.config, manifest.label_space.num_classes - 1, train.stage_dir, device)
        make_cams(model, manifest, ids, writer, self.scales, self.flip, device, progress=progress)
        return {}


class MakeCAMShard(ShardTask):
    parent_class = MakeCAM
    gpus = 1


MakeCAM.shard_task = MakeCAMShard



@with_config(C.EvalCAMConfig)
class EvalCAM(StageTask):
    """Score CAMs on the eval list: mIoU at the configured threshold and the whole threshold curve."""

    code = ("stages.eval_cam",)

    def upstream(self) -> dict[str, StageTask]:
        return {"dataset": self.stage(PrepareDataset), "cams": self.stage(MakeCAM)}

    def compute(self, out_dir: Path) -> dict:
        from stages.eval_cam import evaluate_cams
        result = evaluate_cams(self.config, manifest_of(self), shard_store(self.input_dir("cams")), out_dir,
                               progress=self.progress)
        logger.info("EvalCAM: mIoU %.2f at threshold %.2f (best %.2f at %.2f)", 100 * result["miou"],
                    self.bg_threshold, 100 * result["best_miou"], result["best_threshold"])
        return result


@with_config(C.ExtractSeedsConfig)
class ExtractSeeds(ShardedStage):
    """Confident seeds (palette PNGs, 255 = ignore) from the full-resolution CAMs."""

    code = ("stages.extract_seeds",)

    def upstream(self) -> dict[str, StageTask]:
        return {"dataset": self.stage(PrepareDataset), "cams": self.stage(MakeCAM)}

    def compute_shard(self, ids, out_dir, writer, manifest, progress) -> dict:
        from stages.extract_seeds import extract_seeds
        return extract_seeds(self.config, manifest, ids, shard_store(self.input_dir("cams")), out_dir, writer,
                             progress=progress)


class ExtractSeedsShard(ShardTask):
    parent_class = ExtractSeeds


ExtractSeeds.shard_task = ExtractSeedsShard


@with_config(C.TrainAffinityConfig)
class TrainAffinity(StageTask):
    """Train the inter-pixel relation net (AffinityNet or IRNet) on the seeds of the training images."""

    code = ("stages.affinity",)
    gpus = 1

    def upstream(self) -> dict[str, StageTask]:
        return {"dataset": self.stage(PrepareDataset), "seeds": self.stage(ExtractSeeds),
                "cam_net": self.stage(TrainCAM),
                **pretraining_upstream(self)}

    def compute(self, out_dir: Path) -> dict:
        import torch

        from data.io import read_label_png
        from stages.affinity import train_affinity
        from stages.cam_methods import CHECKPOINT
        from stages.extract_seeds import label_file
        from stages.supervision import extra_label_file

        rt = runtime()
        manifest = manifest_of(self)
        seeds_dir = self.input_dir("seeds")
        scores = shard_store(seeds_dir)
        # Scribbles: the reference trains its affinity net on the CAM seeds with the scribbles on top, not on the
        # superpixel-grown scribbles the GNN learns from.
        affinity_seeds = seeds_dir / "scribble_affinity"

        def seed_label(image_id: str):
            if affinity_seeds.is_dir():
                return read_label_png(extra_label_file(seeds_dir, "scribble_affinity", image_id),
                                      manifest.label_space)
            return read_label_png(label_file(seeds_dir, image_id), manifest.label_space)

        def seed_scores(image_id: str):
            if image_id not in scores:
                return None
            arrays, _ = scores.read(image_id, ["la", "ha"])
            return arrays["la"], arrays["ha"]

        cam_state = None
        if self.init_from_cam and not self.pretrained:
            cam_state = torch.load(self.input_dir("cam_net") / CHECKPOINT, map_location="cpu", weights_only=True)
        return train_affinity(with_weights_path(self), manifest, manifest.splits["train"], seed_label, seed_scores,
                              out_dir, resolve_device(rt.device), cam_backbone_state=cam_state,
                              loader_workers=rt.loader_workers, progress=self.progress)


class TrainingStage(StageTask):
    """A stage that trains a net with resume checkpoints in ``<key>.resume/``, removed once the model is out."""

    @property
    def resume_dir(self) -> Path:
        """Outside the temporary stage directory, which a failed run deletes: a killed run resumes from here."""
        return self.stage_dir.with_name(self.key + RESUME_SUFFIX)

    def run(self) -> None:
        super().run()
        remove_path(self.resume_dir)  # only once the trained model is published


@with_config(C.TrainSeedNetConfig)
class TrainSeedNet(TrainingStage):
    """DGCN / DSRG: a segmentation net trained from the seeds while they regrow (graph cut or region growing)
    every iteration; Propagate (``propagation = graphcut | dsrg``) predicts the pseudo labels with it."""

    code = ("stages.seed_training",)
    gpus = 1

    def upstream(self) -> dict[str, StageTask]:
        return {"dataset": self.stage(PrepareDataset), "seeds": self.stage(ExtractSeeds),
                **pretraining_upstream(self)}

    def compute(self, out_dir: Path) -> dict:
        from data.io import read_label_png
        from stages.extract_seeds import label_file
        from stages.seed_training import train_seed_net

        rt = runtime()
        manifest = manifest_of(self)
        seeds_dir = self.input_dir("seeds")

        def seed_label(image_id: str):
            return read_label_png(label_file(seeds_dir, image_id), manifest.label_space)
        return train_seed_net(with_weights_path(self), manifest, manifest.splits["train"], seed_label, out_dir,
                              resolve_device(rt.device), resume_dir=self.resume_dir, loader_workers=rt.loader_workers,
                              processes=rt.cut_processes, progress=self.progress)


@with_config(C.PropagateConfig)
class Propagate(ShardedStage):
    """Random walk from the CAMs over the learned affinities: pseudo-label PNGs and class scores."""

    code = ("stages.propagate",)

    def upstream(self) -> dict[str, StageTask]:
        up = {"dataset": self.stage(PrepareDataset), "cams": self.stage(MakeCAM), "seeds": self.stage(ExtractSeeds)}
        if self.propagation in C.SEED_NET_PROPAGATIONS:
            up["seed_net"] = self.stage(TrainSeedNet)
        else:
            up["affinity"] = self.stage(TrainAffinity)
        return up

    def compute_shard(self, ids, out_dir, writer, manifest, progress) -> dict:
        from stages.propagate import affinity_net_inputs, propagate_images, seed_net_inputs, validate_propagation

        upstream = self.upstream()
        device = resolve_device(runtime().device)
        if "seed_net" in upstream:
            from stages.seed_training import load_seed_net
            trained = upstream["seed_net"]
            validate_propagation(self.config, seed_net_method=trained.method)
            model = load_seed_net(trained.config, manifest.label_space.num_classes, trained.stage_dir, device)
            inputs = seed_net_inputs(trained.config, model, device)
        else:
            from stages.affinity import load_affinity_model
            affinity = upstream["affinity"]
            validate_propagation(self.config, affinity.affinity_method)
            model = load_affinity_model(affinity.config, affinity.stage_dir, device)
            inputs = affinity_net_inputs(model, device, self.propagation)
        return propagate_images(self.config, manifest, ids, shard_store(self.input_dir("cams")),
                                self.input_dir("seeds"), inputs, out_dir, writer, device, progress=progress,
                                supervision=upstream["seeds"].supervision)


class PropagateShard(ShardTask):
    parent_class = Propagate
    gpus = 1


Propagate.shard_task = PropagateShard


@with_config(C.EvalPseudoLabelsConfig)
class EvalPseudoLabels(StageTask):
    """Score pseudo labels and seeds on the eval list; report CAM -> seeds -> pseudo-label mIoU."""

    code = ("stages.eval_pseudo",)

    def upstream(self) -> dict[str, StageTask]:
        return {"dataset": self.stage(PrepareDataset), "cam_eval": self.stage(EvalCAM),
                "seeds": self.stage(ExtractSeeds), "labels": self.stage(Propagate), "refined": self.stage(RefineCRF)}

    def compute(self, out_dir: Path) -> dict:
        from stages.eval_pseudo import evaluate_pseudo_labels

        def stage_metrics(name: str) -> dict:
            return read_json(self.input_dir(name) / PROVENANCE)["metrics"]

        upstream = {"cam": read_json(self.input_dir("cam_eval") / "metrics.json"),
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

    code = ("stages.refine",)

    def upstream(self) -> dict[str, StageTask]:
        return {"dataset": self.stage(PrepareDataset), "labels": self.stage(Propagate)}

    def compute_shard(self, ids, out_dir, writer, manifest, progress) -> dict:
        from stages.refine import refine_pseudo_labels
        rt = runtime()
        return refine_pseudo_labels(self.config, manifest, ids, shard_store(self.input_dir("labels")), out_dir,
                                    resolve_device(rt.device), progress=progress)


class RefineCRFShard(ShardTask):
    parent_class = RefineCRF


RefineCRF.shard_task = RefineCRFShard

LABEL_SOURCES = ("pseudo", "gt")


@with_config(C.TrainSegmentationConfig)
class TrainSegmentation(TrainingStage):
    """DeepLab trained on the pseudo labels, or (``--labels gt``) on GT: the fully supervised ceiling."""

    code = ("stages.segmentation",)
    gpus = 1
    labels = luigi.ChoiceParameter(choices=LABEL_SOURCES, default="pseudo")

    def fingerprint(self) -> dict:
        return {"labels": self.labels}

    def upstream(self) -> dict[str, StageTask]:
        up: dict[str, StageTask] = {"dataset": self.stage(PrepareDataset), **pretraining_upstream(self)}
        if self.labels == "pseudo":
            up["pseudo_labels"] = self.stage(RefineCRF) if self.pseudo_labels == "crf" else self.stage(Propagate)
        return up

    def compute(self, out_dir: Path) -> dict:
        from data.io import read_label_png
        from stages.extract_seeds import label_file
        from stages.segmentation import train_segmentation

        rt = runtime()
        manifest = manifest_of(self)
        if self.labels == "gt":
            def label_of(image_id: str, shape: tuple[int, int]):
                return manifest.layout.read_label(image_id, shape=shape)
        else:
            labels_dir = self.input_dir("pseudo_labels")

            def label_of(image_id: str, shape: tuple[int, int]):
                return read_label_png(label_file(labels_dir, image_id), manifest.label_space, shape=shape)
        metrics = train_segmentation(with_weights_path(self), manifest, label_of, out_dir, resolve_device(rt.device),
                                     resume_dir=self.resume_dir, loader_workers=rt.loader_workers,
                                     progress=self.progress)
        return metrics


@with_config(C.EvalSegmentationConfig)
class EvalSegmentation(ShardedStage):
    """DeepLab predictions on the val list (palette PNGs) and their mIoU, with and without the test-time CRF."""

    code = ("stages.segmentation",)
    labels = luigi.ChoiceParameter(choices=LABEL_SOURCES, default="pseudo")
    variant_params = ("labels",)

    def fingerprint(self) -> dict:
        return {"labels": self.labels}

    def upstream(self) -> dict[str, StageTask]:
        return {"dataset": self.stage(PrepareDataset), "model": self.stage(TrainSegmentation, labels=self.labels)}

    def shard_members(self, manifest: Manifest) -> list[str]:
        return list(manifest.splits["val"])

    def compute_shard(self, ids, out_dir, writer, manifest, progress) -> dict:
        from stages.segmentation import load_segmenter, predict_images

        trained = self.upstream()["model"]
        device = resolve_device(runtime().device)
        model = load_segmenter(trained.config, manifest.label_space.num_classes, trained.stage_dir, device)
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
        from stages.segmentation import write_segmentation_metrics
        joined = super().compute(out_dir)
        metrics = write_segmentation_metrics(self.config, manifest_of(self).label_space, joined, out_dir,
                                             labels=self.labels)
        logger.info("EvalSegmentation (%s labels): val mIoU %.2f (%.2f before the CRF)", self.labels,
                    100 * metrics["miou"], 100 * metrics["miou_no_crf"])
        return metrics


class EvalSegmentationShard(ShardTask):
    parent_class = EvalSegmentation
    gpus = 1


EvalSegmentation.shard_task = EvalSegmentationShard


@with_config(C.ReportConfig)
class Report(StageTask):
    """The run report: one self-contained HTML file and a Markdown summary of every stage."""

    code = ("stages.report", "stages.run_report")

    def upstream(self) -> dict[str, StageTask]:
        return {"dataset": PrepareDataset(), "cam_eval": EvalCAM(), "cams": MakeCAM(), "seeds": ExtractSeeds(),
                "labels": Propagate(), "refined": RefineCRF(), "pseudo_eval": EvalPseudoLabels(),
                "segmenter": TrainSegmentation(), "segmentation": EvalSegmentation(),
                "ceiling_segmenter": TrainSegmentation(labels="gt"),
                "ceiling": EvalSegmentation(labels="gt"),
                **{f"compare:{spec}": stage_in_variant(EvalPseudoLabels, C.variant_overrides(spec))
                   for spec in self.compare}}

    def comparison(self) -> list[dict]:
        """One row per method, the main chain's first, then ``compare``'s: pseudo-label mIoU and compute time."""
        upstream = self.upstream()
        rows = []
        for spec in ("", *self.compare):
            evaluation = upstream[f"compare:{spec}" if spec else "pseudo_eval"]
            chain = evaluation.upstream()
            propagate, seeds = chain["labels"], chain["seeds"]
            trainer = propagate.upstream().get("affinity") or propagate.upstream()["seed_net"]
            records = {name: read_json(task.stage_dir / PROVENANCE) for name, task in
                       (("trainer", trainer), ("propagate", propagate), ("crf", chain["refined"]))}
            rows.append({"method": spec or f"{propagate.propagation}/{seeds.supervision} (main chain)",
                         "trainer": trainer.stage_name, **read_json(evaluation.stage_dir / "metrics.json")["chain"],
                         "train_seconds": records["trainer"]["seconds"],
                         # summed over shards: the compute time whatever the number of workers
                         "propagate_seconds": records["propagate"]["metrics"].get("shard_seconds"),
                         "crf_seconds": records["crf"]["metrics"].get("shard_seconds"),
                         "propagated_images": records["propagate"]["metrics"].get("images")})
        return rows

    def compute(self, out_dir: Path) -> dict:
        from stages.run_report import build_report
        graph = stage_graph()
        upstream = self.upstream()
        dirs = {name: task.stage_dir for name, task in upstream.items()}
        config = {family: task.params_dict for family, task in graph.items()}
        provenance = {family: read_json(task.stage_dir / PROVENANCE) for family, task in graph.items()
                      if task.stage_dir != self.stage_dir and (task.stage_dir / PROVENANCE).is_file()}
        return build_report(self.config, manifest_of(self), dirs, config, provenance,
                            segmenter_config=upstream["segmenter"].config,
                            eval_config=upstream["segmentation"].config, device=resolve_device(runtime().device),
                            out_dir=out_dir, comparison=self.comparison())


class FullWSSS(luigi.WrapperTask):
    """The whole chain: CAM -> seeds -> affinity net -> propagation -> CRF -> DeepLab -> evaluation -> report."""

    def requires(self):
        return self.requires_stages()

    def requires_stages(self) -> list[StageTask]:
        return [Report()]


# Order matters for status/clean: upstream first.
STAGES: tuple[type[StageTask], ...] = (PrepareDataset, PretrainBackbone, TrainCAM, MakeCAM, EvalCAM, ExtractSeeds,
                                       TrainAffinity, TrainSeedNet, Propagate, RefineCRF, EvalPseudoLabels,
                                       TrainSegmentation, EvalSegmentation, Report)


def stage_graph() -> dict[str, StageTask]:
    """The stages the current configuration's FullWSSS runs, upstream first, by stage name."""
    used: dict[str, StageTask] = {}
    pending = [task for task in FullWSSS().requires_stages()]
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



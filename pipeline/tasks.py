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
from functools import cached_property
from pathlib import Path

import luigi

from data.io import atomic_path, read_json, remove_path, write_json
from data.manifest import Manifest
from pipeline import hashing
from stages import config as C
from stages.runtime import configure_threads, resolve_device, versions

logger = logging.getLogger("luigi-interface")
PROVENANCE = "provenance.json"
PARTS_SUFFIX = ".parts"


class wsss(luigi.Config):  # noqa: N801 - the section is called [wsss]
    """Runtime settings (never part of a key); fields mirror stages.config.RuntimeConfig."""

    work_dir = luigi.Parameter(default=C.RuntimeConfig.work_dir)
    device = luigi.Parameter(default=C.RuntimeConfig.device)
    loader_workers = luigi.IntParameter(default=C.RuntimeConfig.loader_workers)
    torch_threads = luigi.IntParameter(default=C.RuntimeConfig.torch_threads)


def runtime() -> C.RuntimeConfig:
    section = wsss()
    return C.RuntimeConfig(work_dir=section.work_dir, device=section.device,
                           loader_workers=section.loader_workers, torch_threads=section.torch_threads)


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
    """A shard file, either waiting in ``<key>.parts/`` or already published into ``<key>/``."""

    def __init__(self, final: Path, part: Path):
        self.final, self.part = final, part

    def exists(self) -> bool:
        return self.final.is_file() or self.part.is_file()


class StageTask(luigi.Task):
    """Base of every stage: key, directory, atomic publication and provenance."""

    config_class: type | None = None
    code: tuple[str, ...] = ()     # library modules this stage runs (their imports are followed)
    accepts_messages = False

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
        params = dataclasses.asdict(cfg) if cfg is not None else {}
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

    def run(self) -> None:
        rt = runtime()
        configure_threads(rt.torch_threads)
        started = time.time()
        with atomic_path(self.stage_dir, directory=True) as tmp:
            metrics = self.compute(tmp) or {}
            write_json(tmp / PROVENANCE, self.provenance(started, metrics))
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


@with_config(C.TrainCAMConfig)
class TrainCAM(StageTask):
    """Train the CAM classification network."""

    code = ("stages.train_cam",)

    def upstream(self) -> dict[str, StageTask]:
        return {"dataset": PrepareDataset()}

    def compute(self, out_dir: Path) -> dict:
        from stages.train_cam import train_cam
        rt = runtime()
        return train_cam(self.config, manifest_of(self), out_dir, resolve_device(rt.device),
                         loader_workers=rt.loader_workers, progress=self.progress)


def shard_ids(ids: list[str], shard_size: int) -> list[list[str]]:
    """Deterministic shard membership: consecutive runs of the (ordered) id list."""
    return [ids[i:i + shard_size] for i in range(0, len(ids), shard_size)]


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.h5"


@with_config(C.MakeCAMConfig)
class MakeCAM(StageTask):
    """Multi-scale CAMs for every training and evaluation image, computed in shards."""

    code = ("stages.make_cam", "stages.cam_methods")

    def upstream(self) -> dict[str, StageTask]:
        return {"dataset": PrepareDataset(), "cam_net": TrainCAM()}

    def shards(self, manifest: Manifest | None = None) -> list[list[str]]:
        """Image ids of train + eval, split into shards (membership fixed by the manifest's order)."""
        splits = (manifest or manifest_of(self)).splits
        return shard_ids(list(dict.fromkeys(splits["train"] + splits["eval"])), self.shard_size)

    @property
    def parts_dir(self) -> Path:
        return self.stage_dir.with_name(self.key + PARTS_SUFFIX)

    def run(self):
        shards = self.shards()
        # Dynamic dependencies: the shard count is known only once the dataset manifest exists.
        yield [MakeCAMShard(shard=i, n_shards=len(shards)) for i in range(len(shards))]
        super().run()
        remove_path(self.parts_dir)  # only now: the published directory holds every shard

    def compute(self, out_dir: Path) -> dict:
        shards = self.shards()
        index = {}
        for i, members in enumerate(shards):
            name = shard_name(i, len(shards))
            # Link, not move: if publishing fails, the computed shards stay where they were.
            os.link(self.parts_dir / name, out_dir / name)
            index.update({image_id: name for image_id in members})
        write_json(out_dir / "index.json", {"shards": [shard_name(i, len(shards)) for i in range(len(shards))],
                                            "images": index})
        return {"images": len(index), "shards": len(shards)}


class MakeCAMShard(luigi.Task):
    """One shard of MakeCAM: loads the CAM net once, writes one HDF5 file atomically."""

    shard = luigi.IntParameter()
    n_shards = luigi.IntParameter()

    @cached_property
    def parent(self) -> MakeCAM:
        return MakeCAM()

    def requires(self):
        return self.parent.upstream()

    def output(self) -> ShardTarget:
        name = shard_name(self.shard, self.n_shards)
        return ShardTarget(self.parent.stage_dir / name, self.parent.parts_dir / name)

    def run(self) -> None:
        from data.dense import DenseMapWriter
        from stages.cam_methods import load_cam_model
        from stages.make_cam import make_cams

        rt = runtime()
        configure_threads(rt.torch_threads)
        parent = self.parent
        manifest = manifest_of(parent)
        shards = parent.shards(manifest)
        if len(shards) != self.n_shards:
            raise RuntimeError(f"MakeCAM: expected {self.n_shards} shards, the manifest gives {len(shards)}")
        train = parent.upstream()["cam_net"]
        device = resolve_device(rt.device)
        model = load_cam_model(train.config, manifest.label_space.num_classes - 1, train.stage_dir, device)
        attrs = {"stage": "MakeCAM", "key": parent.key, "shard": self.shard, "n_shards": self.n_shards}
        with DenseMapWriter(self.output().part, attrs) as writer:
            make_cams(model, manifest, shards[self.shard], writer, parent.config.scales, parent.config.flip,
                      device, progress=lambda p, m: report_progress(self, p, m))


def cam_store(make_cam_dir: Path):
    """Reader over a published MakeCAM directory."""
    from data.dense import DenseMapReader
    index = read_json(make_cam_dir / "index.json")
    return DenseMapReader(make_cam_dir / name for name in index["shards"])


@with_config(C.EvalCAMConfig)
class EvalCAM(StageTask):
    """Score CAMs on the eval list: mIoU at the configured threshold and the whole threshold curve."""

    code = ("stages.eval_cam",)

    def upstream(self) -> dict[str, StageTask]:
        return {"dataset": PrepareDataset(), "cams": MakeCAM()}

    def compute(self, out_dir: Path) -> dict:
        from stages.eval_cam import evaluate_cams
        result = evaluate_cams(self.config, manifest_of(self), cam_store(self.input_dir("cams")), out_dir,
                               progress=self.progress)
        logger.info("EvalCAM: mIoU %.2f at threshold %.2f (best %.2f at %.2f)", 100 * result["miou"],
                    self.bg_threshold, 100 * result["best_miou"], result["best_threshold"])
        return result


class FullWSSS(luigi.WrapperTask):
    """The whole chain, ending at the furthest stage that exists."""

    def requires(self):
        return EvalCAM()


# Order matters for status/clean: upstream first.
STAGES: tuple[type[StageTask], ...] = (PrepareDataset, TrainCAM, MakeCAM, EvalCAM)


def stage_graph() -> dict[str, StageTask]:
    """The current configuration's stage instances by family name."""
    return {cls.get_task_family(): cls() for cls in STAGES}


def downstream_of(family: str) -> list[str]:
    graph = stage_graph()
    hit = {family}
    for name, task in graph.items():  # STAGES is topologically ordered
        if any(up.get_task_family() in hit for up in task.upstream().values()):
            hit.add(name)
    return [name for name in graph if name in hit]



"""The task framework: how a stage is keyed, placed, run and published (the stage table is pipeline.tasks).

Each stage writes under ``<work_dir>/<Stage>/<key>/``. The key hashes the stage's parameters, the code it runs
for the configured choices and its inputs' keys (pipeline.hashing), so an edit or a config change gives a new
directory and Luigi recomputes exactly the affected stages; reverting finds the old directory again. A stage
directory is built as a temporary sibling and renamed into place when complete, with ``provenance.json`` inside:
a directory that exists is a finished artifact. A per-image stage runs as shards (:class:`ShardedStage`), whose
shard task class is generated with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import luigi

from data.artifacts import INPUTS_RECORD, PARTS_SUFFIX, PROVENANCE, RESUME_SUFFIX, SHARD_INDEX
from data.io import (
    AlreadyPublishedError,
    atomic_path,
    naming_a_full_disk,
    read_json,
    remove_path,
    temporary_copies,
    write_json,
)
from data.manifest import Manifest
from pipeline import hashing
from pipeline.checks import check_runtime, validate_config
from pipeline.devices import assigned_gpus, cpu_share, will_use_cuda
from pipeline.settings import knob_description, runtime
from pipeline.submit import run_as_job  # also registers [submitit] for --submitit-* on the command line
from pipeline.variants import plain_value
from stages import config as C
from stages.runtime import configure_threads, rebalance_threads, thread_policy, versions

if TYPE_CHECKING:
    from data.dense import DenseMapWriter

logger = logging.getLogger("luigi-interface")

PENDING = "pending-"   # a key prefix: an input's content is not known yet (see StageTask.key)


class AutoKnobParameter(luigi.Parameter):
    """An integer knob (``pair``: a pair of integers) that also takes ``auto`` or ``auto:<reference>``
    (stages.config.AUTO_KNOBS)."""

    def __init__(self, *args, pair: bool = False, **kwargs) -> None:
        self.pair = pair
        super().__init__(*args, **kwargs)

    def parse(self, x: str) -> str | int | tuple[int, int]:
        return C.parse_auto(x, self.pair)

    def normalize(self, x: object) -> object:
        if isinstance(x, int) or (self.pair and isinstance(x, tuple)):
            return x
        if self.pair and isinstance(x, list):
            return tuple(x)
        return C.parse_auto(str(x), self.pair)

    def serialize(self, x: object) -> str:
        return f"[{x[0]}, {x[1]}]" if isinstance(x, tuple) else str(x)


def _parameter_for(default: object, description: str | None = None, auto: bool = False) -> luigi.Parameter:
    if auto:
        return AutoKnobParameter(default=default, description=description, pair=isinstance(default, tuple))
    if isinstance(default, bool):
        return luigi.BoolParameter(default=default, parsing=luigi.BoolParameter.EXPLICIT_PARSING,
                                   description=description)
    if isinstance(default, int):
        return luigi.IntParameter(default=default, description=description)
    if isinstance(default, float):
        return luigi.FloatParameter(default=default, description=description)
    if isinstance(default, tuple):
        return luigi.TupleParameter(default=default, description=description)
    return luigi.Parameter(default=default, description=description)


def with_config(config_class: type):
    """Give a task one Luigi parameter per field of a stages.config dataclass, described by the comments beside
    the field (stages.config.knob_help)."""
    section = {cls: name for name, cls in C.STAGE_CONFIGS.items()}[config_class]
    docs = C.knob_help()[section]

    def decorate(task_class: type) -> type:
        task_class.config_class = config_class
        auto = C.AUTO_KNOBS.get(section, {})
        for f in dataclasses.fields(config_class):
            param = _parameter_for(f.default, knob_description(docs[f.name], f.default), auto=f.name in auto)
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
    input_cores = 0                # cores its data pipeline keeps busy beside torch (taken off its thread share)
    accepts_messages = False
    # A compared method's chain (Report.compare; pipeline.variants.variant_overrides): per task family the parameters
    # it overrides, and its name, which lists those overrides that reach this task (see `stage_in_variant`), so
    # one name is one computation. The overridden parameters themselves enter the key.
    variant = luigi.Parameter(default="")
    overrides = luigi.DictParameter(default={}, significant=False)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Fail while scheduling, naming the key, rather than hours later inside the stage (once per task).
        rt = runtime()
        check_runtime(rt)
        submitted_families(rt)
        if self.config_class is not None:
            validate_config(self.config, self.get_task_family())

    # -- identity
    @cached_property
    def config(self):
        if self.config_class is None:
            return None
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self.config_class)}
        return self.config_class(**{k: plain_value(v) for k, v in values.items()})

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
        # stages.auto resolves the knobs set to ``auto``: its rules are then part of what makes the output.
        fitted = ("stages.auto",) if self.config is not None and C.fits_to_data(self.config) else ()
        return hashing.module_closure((*self.code_roots(), *fitted))

    @cached_property
    def fitted(self) -> tuple[object, dict, list[str]]:
        """The config with its ``auto`` knobs resolved for this dataset (stages.auto), a record of each (value,
        rule), and warnings for hand-set scale-dependent knobs far from what ``auto`` would choose."""
        cfg = self.config
        if C.section_of(cfg) not in C.AUTO_KNOBS:
            return cfg, {}, []
        from stages.auto import dataset_scale, fit_knobs
        fitted, record, warnings = fit_knobs(cfg, dataset_scale(manifest_of(self)))
        # a knob this configuration does not read (another method's walk) stays `auto`: its default, so that no
        # code the stage runs meets the text
        return C.with_references(fitted), record, warnings

    @property
    def run_config(self):
        """The config a stage computes with: :attr:`config` with ``auto`` values resolved for the data."""
        return self.fitted[0]

    def code_roots(self) -> tuple[str, ...]:
        """The library modules this stage runs for its configuration (their imports are followed); a stage with a
        method choice adds the chosen method's module to ``code``."""
        return self.code

    def key_params(self, cfg) -> dict:
        """The parameters that make this stage's output (its key and provenance): all but the knobs an ``auto``
        rule says this configuration does not read; a stage may leave out more."""
        unread = C.unread_auto_knobs(cfg)
        return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in unread}

    @cached_property
    def params_dict(self) -> dict:
        cfg = self.config
        params = {} if cfg is None else self.key_params(cfg)
        params.update(self.fingerprint())
        return params

    @property
    def key(self) -> str:
        """Parameters, code and the inputs' :attr:`content_key`. While an input's content is not known yet (an
        external dataset not prepared for the current files) the key is a placeholder ``pending-...`` that names
        no directory and is recomputed on each use; it settles once the input is published."""
        cached = self.__dict__.get("_settled_key")
        if cached is not None:
            return cached
        inputs, pending = {}, False
        for name, task in self.upstream().items():
            content = task.content_key
            pending |= content is None or content.startswith(PENDING)
            inputs[name] = content or f"{PENDING}{task.key}"
        key = hashing.stage_key(self.get_task_family(), self.params_dict, self.code_modules, inputs)
        if pending:
            return PENDING + key
        self.__dict__["_settled_key"] = key
        return key

    @property
    def content_key(self) -> str | None:
        """What stages reading this one put in their keys: its key (None while that content is not known)."""
        return self.key

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
        from stages.refine.crf import set_default_backend  # lazily: stages.refine.crf is only needed by CRF stages
        set_default_backend(rt.crf_backend)
        started = time.time()
        if self.key.startswith(PENDING):
            raise RuntimeError(f"{self.get_task_family()}: its inputs are not published yet (key {self.key})")
        if self.output().exists():  # scheduled before its input settled, or published by another run since
            logger.info("%s: %s already holds this result", self.get_task_family(), self.stage_dir)
            return
        warn_of_other_copies(self.get_task_family(), self.stage_dir)
        for warning in self.fitted[2]:
            logger.warning("%s: %s", self.get_task_family(), warning)
        try:
            with atomic_path(self.stage_dir, directory=True) as tmp, naming_a_full_disk(tmp):
                metrics, placement = run_compute(self, tmp)
                write_json(tmp / PROVENANCE, self.provenance(started, metrics) | placement)
        except Exception as err:
            if published_meanwhile(self.get_task_family(), self.output().exists(), self.stage_dir, err):
                return
            if isinstance(err, AlreadyPublishedError):
                raise FileExistsError(f"{self.stage_dir}: a directory without {PROVENANCE} is in the way: not a "
                                      "result this pipeline published (damaged, or made by something else); "
                                      "remove it to compute this stage") from None
            raise
        logger.info("%s done in %.1f s -> %s", self.get_task_family(), time.time() - started, self.stage_dir)

    def input_records(self) -> dict:
        return {name: {"stage": t.get_task_family(), "key": t.key} for name, t in self.upstream().items()}

    def record_inputs(self, directory: Path) -> None:
        """Write which stage directories the unfinished work in ``directory`` reads, so that ``gc`` run under
        another configuration keeps them while that work may resume."""
        directory.mkdir(parents=True, exist_ok=True)
        write_json(directory / INPUTS_RECORD, {"stage": self.get_task_family(), "key": self.key,
                                               "inputs": self.input_records()})

    def provenance(self, started: float, metrics: dict) -> dict:
        return {
            "stage": self.get_task_family(), "key": self.key, "params": self.params_dict,
            "code": self.code_modules, "code_digest": hashing.code_digest(self.code_modules),
            "inputs": self.input_records(),
            "seed": self.params_dict.get("seed"), "versions": versions(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "seconds": round(time.time() - started, 3), "metrics": metrics,
            **({"fitted": {"knobs": self.fitted[1], "warnings": self.fitted[2]}}
               if self.fitted[1] or self.fitted[2] else {}),
        }


def warn_of_other_copies(family: str, path: Path) -> None:
    """Say so when a temporary copy of ``path`` exists: two runs are computing the same result."""
    copies = temporary_copies(path)
    if copies:
        more = f" (and {len(copies) - 1} more)" if len(copies) > 1 else ""
        logger.warning("%s: %s%s exists: another run is computing this result now (two runs without the scheduler's "
                       "lock: --no-lock, or two schedulers), or a killed run left it (`python -m pipeline gc` removes "
                       "it). Computing it here too: the first to finish publishes it, the other keeps that one",
                       family, copies[0], more)


def published_meanwhile(family: str, published: bool, path: Path, err: Exception) -> bool:
    """Whether ``err`` ended a computation of ``path`` that another run published meanwhile (``published``: its
    target exists now); then it is logged as what it is, and the published result stands."""
    if not published:
        return False
    then = "" if isinstance(err, AlreadyPublishedError) else f"; this run then stopped on: {err!r}"
    logger.warning("%s: another run published %s while this one was computing it (two runs without the scheduler's "
                   "lock: --no-lock, or two schedulers): that result is kept, this run's copy discarded%s",
                   family, path, then)
    return True


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
    placement: dict = {}
    with task_threads(rt, placement, reserved=task.input_cores):
        if n_gpus and not rt.device.startswith("cuda:"):  # an explicit cuda:N means the user placed it
            with assigned_gpus(n_gpus, rt.gpus, rt.gpu_lock_dir, rt.gpu_wait_s) as allocation:
                logger.info("%s: on GPU %s", task.get_task_family(), allocation.visible_devices)
                placement["gpus"] = allocation.devices
                metrics = task.compute(out_dir) or {}
        else:
            metrics = task.compute(out_dir) or {}
    return metrics, placement


@contextlib.contextmanager
def task_threads(rt: C.RuntimeConfig, record: dict, reserved: int = 0) -> Iterator[None]:
    """``[wsss] torch_threads`` when set; else (0) this task's share of the cores among the tasks computing on
    this host, re-read as they start and end (``pipeline.devices.cpu_share``). ``record["torch_threads"]`` gets
    the counts used: float sums can differ in their last bits between counts, so a rerun that must be bitwise
    identical fixes ``torch_threads``."""
    if rt.torch_threads > 0:
        configure_threads(rt.torch_threads)
        record["torch_threads"] = [rt.torch_threads]
        yield
        return
    with cpu_share(rt.gpu_lock_dir) as share, thread_policy(lambda: share.threads(reserved)) as used:
        try:
            yield
        finally:
            record["torch_threads"] = sorted(used)


def report_progress(task: luigi.Task, percent: float, message: str) -> None:
    """Forward progress to the scheduler (shown by luigid) and to the log."""
    task.set_progress_percentage(int(percent))
    task.set_status_message(message)
    logger.info("%s: %s", task.get_task_family(), message)
    rebalance_threads()  # a progress report is a point the compute thread passes often


def manifest_of(task: StageTask) -> Manifest:
    return Manifest.load(task.input_dir("dataset"))


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

    shard_task: type[ShardTask]            # generated with the class: <Stage>Shard, in the stage's module
    shard_gpus = 0                         # as StageTask.gpus, for one shard
    variant_params: tuple[str, ...] = ()   # the stage's Luigi parameters outside its config (passed to shards)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        # Luigi finds a task class by its family name in the imported module: luigid workers need the shard class
        # to exist under that name, so it is generated and published there.
        shard = type(f"{cls.__name__}Shard", (ShardTask,),
                     {"parent_class": cls, "gpus": cls.shard_gpus, "__module__": cls.__module__,
                      "__doc__": f"One shard of :class:`{cls.__name__}`."})
        cls.shard_task = shard
        setattr(sys.modules[cls.__module__], shard.__name__, shard)

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
        write_json(out_dir / SHARD_INDEX, {"shards": names, "images": index})
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
    input_cores = 0                # as StageTask.input_cores

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
        from stages.refine.crf import set_default_backend  # lazily: stages.refine.crf is only needed by CRF stages
        set_default_backend(rt.crf_backend)
        parent = self.parent
        members = self.members()
        started = time.time()
        if self.output().exists():  # published by another run since this one was scheduled
            logger.info("%s: %s already holds this shard", self.get_task_family(), parent.stage_dir)
            return
        parent.record_inputs(parent.parts_dir)
        warn_of_other_copies(self.get_task_family(), self.output().part)
        try:
            with atomic_path(self.output().part, directory=True) as tmp, naming_a_full_disk(tmp):
                metrics, placement = run_compute(self, tmp)
                write_json(tmp / f"{self.name}.json", {"stage": parent.get_task_family(), "key": parent.key,
                                                       "shard": self.shard, "images": members,
                                                       "seconds": round(time.time() - started, 3),
                                                       "metrics": metrics, **placement})
        except Exception as err:
            # Another run published this shard, or joined the whole stage and removed its parts under this one.
            if not published_meanwhile(self.get_task_family(), self.output().exists(), self.output().part, err):
                raise

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


class TrainingStage(StageTask):
    """A stage that trains a net with resume checkpoints in ``<key>.resume/``, removed once the model is out."""

    @property
    def resume_dir(self) -> Path:
        """Outside the temporary stage directory, which a failed run deletes: a killed run resumes from here."""
        return self.stage_dir.with_name(self.key + RESUME_SUFFIX)

    def run(self) -> None:
        if not self.output().exists():
            self.record_inputs(self.resume_dir)
        try:
            super().run()
        except BaseException:
            # Failed before its first checkpoint: nothing to resume from.
            if self.resume_dir.is_dir() and [p.name for p in self.resume_dir.iterdir()] == [INPUTS_RECORD]:
                remove_path(self.resume_dir)
            raise
        remove_path(self.resume_dir)  # only once the trained model is published

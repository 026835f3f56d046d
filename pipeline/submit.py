"""Per-stage job submission through submitit (Slurm, or a local process for testing).

A task whose family is listed in ``[wsss] submit_stages`` runs its ``compute`` as a batch job instead of
in the Luigi worker: ``run()`` submits a :class:`StageJob`, blocks on the result, then publishes exactly as
an in-process run does (same temporary directory renamed into place, provenance written by the Luigi
side, with the job id added). The Luigi process therefore stays on the login node and holds no GPU.

The job recreates the task from its family and string parameters under a snapshot of the submitting
process's Luigi configuration (every section, with the resolved parameters of the task and of every
stage upstream of it folded in, so command-line overrides travel too) and checks it arrives at the same
cache key. It writes into the temporary directory the parent created, so ``work_dir`` and
``[submitit] folder`` must be on a filesystem the compute nodes share.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shlex
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import luigi
import luigi.configuration

from data.io import log_tail
from pipeline.hashing import PROJECT_ROOT

if TYPE_CHECKING:
    from pipeline.framework import ShardTask, StageTask

logger = logging.getLogger("luigi-interface")
CLUSTERS = ("auto", "slurm", "local", "debug")
STDERR_TAIL_CHARS = 4000


@dataclass(frozen=True)
class SubmititConfig:
    """``[submitit]``: where and how submitted stages run; never part of a cache key."""

    folder: str = ""                    # <folder>/<Stage>/: job pickles and logs (shared FS); "" = <work_dir>/.submitit
    cluster: str = "auto"               # auto (slurm when srun exists, else local) | slurm | local | debug
    timeout_min: int = 240
    slurm_partition: str = ""
    gpus_per_node: int = -1             # -1 = what the stage uses (its GPU count; 0 with [wsss] device = cpu)
    cpus_per_task: int = 4
    mem_gb: float = 0.0                 # 0 = the cluster's default
    slurm_additional_parameters: str = ""   # JSON object of extra sbatch options: {"account": "lab", "qos": "high"}


class submitit(luigi.Config):  # noqa: N801 - the section is called [submitit]
    """Luigi's view of :class:`SubmititConfig` (``[submitit]`` in luigi.cfg, or ``--submitit-cluster local``)."""

    folder = luigi.Parameter(default=SubmititConfig.folder)
    cluster = luigi.Parameter(default=SubmititConfig.cluster)
    timeout_min = luigi.IntParameter(default=SubmititConfig.timeout_min)
    slurm_partition = luigi.Parameter(default=SubmititConfig.slurm_partition)
    gpus_per_node = luigi.IntParameter(default=SubmititConfig.gpus_per_node)
    cpus_per_task = luigi.IntParameter(default=SubmititConfig.cpus_per_task)
    mem_gb = luigi.FloatParameter(default=SubmititConfig.mem_gb)
    slurm_additional_parameters = luigi.Parameter(default=SubmititConfig.slurm_additional_parameters)


def submitit_config() -> SubmititConfig:
    section = submitit()
    cfg = SubmititConfig(**{f.name: getattr(section, f.name) for f in dataclasses.fields(SubmititConfig)})
    if cfg.cluster not in CLUSTERS:
        raise ValueError(f"[submitit] cluster = {cfg.cluster!r}; choose one of {', '.join(CLUSTERS)}")
    additional_parameters(cfg)  # fail on bad JSON before anything is submitted
    return cfg


def additional_parameters(cfg: SubmititConfig) -> dict:
    if not cfg.slurm_additional_parameters.strip():
        return {}
    try:
        extra = json.loads(cfg.slurm_additional_parameters)
    except json.JSONDecodeError as exc:
        raise ValueError(f"[submitit] slurm_additional_parameters is not JSON ({exc}): "
                         f"{cfg.slurm_additional_parameters!r}") from None
    if not isinstance(extra, dict):
        raise ValueError("[submitit] slurm_additional_parameters must be a JSON object, e.g. {\"account\": \"lab\"}")
    return extra


# ------------------------------------------------------------------------------------ the job's side

ConfigSnapshot = dict[str, dict[str, str]]


def stage_of(task: StageTask | ShardTask) -> StageTask:
    """The stage that owns a task's cache key (a shard's parent, or the stage itself)."""
    return getattr(task, "parent", task)


def config_snapshot(task: StageTask | ShardTask) -> ConfigSnapshot:
    """Every section of the current Luigi configuration, with the resolved parameters of the task's stage,
    of every stage upstream of it and of ``[wsss]`` written in (they may have come from the command line)."""
    from pipeline.settings import wsss

    parser = luigi.configuration.get_config()
    snapshot: ConfigSnapshot = {section: dict(parser.items(section)) for section in parser.sections()}
    pending = [stage_of(task)]
    seen: set[str] = set()
    while pending:
        stage = pending.pop()
        if stage.get_task_family() in seen:
            continue
        seen.add(stage.get_task_family())
        snapshot.setdefault(stage.get_task_family(), {}).update(stage.to_str_params())
        pending.extend(stage.upstream().values())
    runtime_section = wsss().to_str_params()
    runtime_section["work_dir"] = str(Path(runtime_section["work_dir"]).resolve())  # the job's cwd may differ
    snapshot.setdefault("wsss", {}).update(runtime_section)
    return snapshot


@contextlib.contextmanager
def applied_config(snapshot: ConfigSnapshot) -> Iterator[None]:
    """Make ``snapshot`` the Luigi configuration for the block; restore the previous one afterwards
    (a job runs in a fresh process, but the debug executor runs it inside the submitting one)."""
    parser = luigi.configuration.get_config()
    previous = {section: dict(parser.items(section, raw=True)) for section in parser.sections()}

    def load(sections: ConfigSnapshot, escape: bool) -> None:
        for section in parser.sections():
            parser.remove_section(section)
        for section, options in sections.items():
            parser.add_section(section)
            for option, value in options.items():
                # Snapshot values are already interpolated: keep a literal % literal.
                parser.set(section, option, value.replace("%", "%%") if escape else value)
        luigi.task_register.Register.clear_instance_cache()

    load(snapshot, escape=True)
    try:
        yield
    finally:
        load(previous, escape=False)


@dataclass(frozen=True)
class StageJob:
    """What a job runs: recreate the task, check its key, compute into ``out_dir``. Plain data, so it pickles."""

    family: str
    params: dict[str, str]
    config: ConfigSnapshot
    key: str
    out_dir: str

    def __call__(self) -> dict:
        from pipeline.settings import runtime
        from stages.runtime import configure_threads

        started = time.time()
        with applied_config(self.config):
            task = luigi.task_register.Register.get_task_cls(self.family).from_str_params(self.params)
            key = stage_of(task).key
            if key != self.key:
                raise RuntimeError(f"{self.family}: the job computes key {key} but was submitted for {self.key}; "
                                   "the code or configuration on the compute node differs from the submitting one")
            # No scheduler to report to from a job: progress goes to the job's log only.
            task.set_progress_percentage = lambda percent: None
            task.set_status_message = lambda message: None
            configure_threads(runtime().torch_threads)
            metrics = task.compute(Path(self.out_dir)) or {}
        return {"metrics": metrics, "host": socket.gethostname(), "seconds": round(time.time() - started, 3)}


# -------------------------------------------------------------------------------- the Luigi side


class JobFailedError(RuntimeError):
    """A submitted stage's job failed; the message holds its error and the tail of its log."""


def make_executor(cfg: SubmititConfig, task: StageTask | ShardTask):
    import submitit as submitit_lib

    from pipeline.settings import runtime

    rt = runtime()
    family = task.get_task_family()
    folder = Path(cfg.folder or Path(rt.work_dir) / ".submitit").resolve() / family
    executor = submitit_lib.AutoExecutor(folder=folder, cluster=None if cfg.cluster == "auto" else cfg.cluster)
    gpus = cfg.gpus_per_node if cfg.gpus_per_node >= 0 else (task.gpus if rt.device != "cpu" else 0)
    params: dict = {"name": f"wsss-{family}", "timeout_min": cfg.timeout_min, "cpus_per_task": cfg.cpus_per_task}
    if gpus > 0:  # some Slurm versions reject an explicit --gpus-per-node=0
        params["gpus_per_node"] = gpus
    if cfg.mem_gb > 0:
        params["mem_gb"] = cfg.mem_gb
    if executor.cluster == "slurm":
        if cfg.slurm_partition:
            params["slurm_partition"] = cfg.slurm_partition
        if extra := additional_parameters(cfg):
            params["slurm_additional_parameters"] = extra
    if executor.cluster in ("slurm", "local"):
        # The job unpickles pipeline.submit.StageJob: let it import this checkout even when not installed.
        root = shlex.quote(str(PROJECT_ROOT))
        params[f"{executor.cluster}_setup"] = [f"export PYTHONPATH={root}${{PYTHONPATH:+:$PYTHONPATH}}"]
    executor.update_parameters(**params)
    return executor


def run_as_job(task: StageTask | ShardTask, out_dir: Path) -> tuple[dict, dict]:
    """Compute ``task`` into ``out_dir`` as a submitit job; block until it ends. Returns (metrics, provenance extra)."""
    cfg = submitit_config()
    executor = make_executor(cfg, task)
    family = task.get_task_family()
    job_spec = StageJob(family=family, params=task.to_str_params(), config=config_snapshot(task),
                        key=stage_of(task).key, out_dir=str(Path(out_dir).resolve()))
    job = executor.submit(job_spec)
    paths = job.paths
    logger.info("%s: submitted %s job %s; log %s", family, executor.cluster, job.job_id, paths.stdout)
    if callable(task.set_status_message):
        task.set_status_message(f"{executor.cluster} job {job.job_id} (log {paths.stdout})")
    try:
        result = job.result()
    except KeyboardInterrupt:
        job.cancel(check=False)  # do not leave a GPU job running for an interrupted pipeline
        raise
    except Exception as exc:  # submitit's FailedJobError/UncompletedJobError carry the job's traceback
        raise JobFailedError(
            f"{family}: {executor.cluster} job {job.job_id} failed: {exc}\n"
            f"--- stderr tail ({paths.stderr}):\n{log_tail(paths.stderr, STDERR_TAIL_CHARS)}\n"
            f"--- stdout log: {paths.stdout}") from None
    record = {"id": job.job_id, "cluster": executor.cluster, "host": result["host"],
              "seconds": result["seconds"], "log": str(paths.stdout)}
    logger.info("%s: job %s done on %s in %.1f s", family, job.job_id, result["host"], result["seconds"])
    return result["metrics"], {"job": record}


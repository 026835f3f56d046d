"""``[wsss]``: the runtime settings (work directory, device, workers); never part of a cache key."""

from __future__ import annotations

import dataclasses

import luigi

from stages import config as C


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

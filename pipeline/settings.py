"""``[wsss]``: the runtime settings (work directory, device, workers); never part of a cache key."""

from __future__ import annotations

import dataclasses

import luigi

from stages import config as C


def knob_description(help_text: str, default: object) -> str:
    """A knob's ``--help-all`` line: its documentation in stages/config.py and its default ('%' escaped: argparse
    formats help strings)."""
    shown = list(default) if isinstance(default, tuple) else default
    text = f"{help_text} (default: {str(shown).lower() if isinstance(shown, bool) else shown!r})"
    return text.replace("%", "%%")


def _setting(parameter: type[luigi.Parameter], name: str) -> luigi.Parameter:
    """The parameter of RuntimeConfig's field ``name``, described by its comment in stages/config.py."""
    default = getattr(C.RuntimeConfig, name)
    return parameter(default=default, description=knob_description(C.knob_help()["wsss"][name], default))


class wsss(luigi.Config):  # noqa: N801 - the section is called [wsss]
    """Runtime settings (never part of a key); fields mirror stages.config.RuntimeConfig."""

    work_dir = _setting(luigi.Parameter, "work_dir")
    device = _setting(luigi.Parameter, "device")
    loader_workers = _setting(luigi.IntParameter, "loader_workers")
    torch_threads = _setting(luigi.IntParameter, "torch_threads")
    train_processes = _setting(luigi.IntParameter, "train_processes")
    gpus = _setting(luigi.Parameter, "gpus")
    gpu_lock_dir = _setting(luigi.Parameter, "gpu_lock_dir")
    gpu_wait_s = _setting(luigi.FloatParameter, "gpu_wait_s")
    submit_stages = _setting(luigi.Parameter, "submit_stages")
    crf_backend = _setting(luigi.Parameter, "crf_backend")
    cut_processes = _setting(luigi.IntParameter, "cut_processes")


def runtime() -> C.RuntimeConfig:
    section = wsss()
    return C.RuntimeConfig(**{f.name: getattr(section, f.name) for f in dataclasses.fields(C.RuntimeConfig)})

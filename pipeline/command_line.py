"""Luigi's command line seen from the project: help for the stage sections, overrides for the inspection
commands, and the record of the last run.

* ``luigi --module pipeline FullWSSS --help`` ends with the stage sections; ``--help-all`` describes every knob by
  the comments beside it in stages/config.py (pipeline.framework.with_config).
* ``python -m pipeline status|summary|gc|clean`` take what ``luigi`` takes after the task (``--EvalCAM-bg-threshold
  0.2``; runtime flags such as ``--workers 2`` are accepted and change nothing there), parsed by Luigi's own parser
  (:func:`command_line`), so they show the run those flags make.
* When ``luigi`` schedules FullWSSS or a stage as its root task, ``<work_dir>/last_run.json`` records the overrides,
  the configuration files read and the stage keys of that run (:func:`record_run`). The inspection commands then
  say when they show another configuration (``--last`` shows the recorded one), and ``gc`` keeps the directories
  of the last run and of those recorded within :data:`RECENT_S` before it.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import luigi
import luigi.configuration
from luigi.cmdline_parser import CmdlineParser
from luigi.task_register import Register

from data.io import BadInputError, read_json, write_json
from pipeline.framework import PENDING, StageTask
from pipeline.presets import PROJECT_CFG, describe, loaded_files, reading, sources
from pipeline.settings import runtime
from pipeline.tasks import FullWSSS, stage_graph
from stages.config import STAGE_CONFIGS, RuntimeConfig, all_knobs

logger = logging.getLogger("luigi-interface")

ROOT = "FullWSSS"
# In <work_dir>; named here, not in data.artifacts: that module is in every stage's code key, this is no artifact.
LAST_RUN = "last_run.json"
RECENT_S = 24 * 3600   # runs recorded within this long before the last one keep their directories from gc too
EARLIER_RUNS = 20      # at most this many of them are remembered


class UsageError(ValueError):
    """A command line that Luigi would refuse; the message names the flag."""


class ConfigurationError(ValueError):
    """A configuration the stages cannot run; the message names the knob and where its value comes from."""


# ------------------------------------------------------------------------------------------------------ help

def stage_sections_help() -> str:
    """The stage sections with their knob counts and what each is, for ``--help``."""
    lines = ["Stage sections: set a knob with --<Section>-<knob> VALUE here (--TrainCAM-lr 0.1), or with",
             "`knob = VALUE` under [<Section>] in a preset. --help-all describes every knob and its default;",
             "`python -m pipeline config` prints the values in force and the file each comes from.", ""]
    for section, cls in {**STAGE_CONFIGS, "wsss": RuntimeConfig}.items():
        count = len(cls.__dataclass_fields__)
        lines.append(f"  {section:<22} {count:>3} knob{'s' if count > 1 else ' '}  {section_summary(cls)}")
    return "\n".join(lines)


def section_summary(config_class: type) -> str:
    """The first sentence of a stages.config class's docstring, in plain text: what its section configures."""
    what = " ".join(inspect.cleandoc(config_class.__doc__ or "").split("\n\n")[0].split())
    what = what.split(": ", 1)[1] if what.startswith("``[") else what
    return what.replace("``", "").split(". ")[0].rstrip(".") + "."


def _show_help_with_sections(parser: argparse.ArgumentParser, known_args: argparse.Namespace) -> None:
    if known_args.core_help or known_args.core_help_all:
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.epilog = stage_sections_help()
    _luigi_help(parser, known_args)


# Luigi prints --help from a parser it builds itself; the sections are added as its epilog (pipeline is imported,
# by --module, before Luigi looks at --help).
_luigi_help = CmdlineParser._possibly_exit_with_help
CmdlineParser._possibly_exit_with_help = staticmethod(_show_help_with_sections)


# ------------------------------------------------------------------------------------------------- overrides

def _flag(section: str, name: str) -> str:
    return f"--{section}-{name.replace('_', '-')}"


def _given(known: argparse.Namespace, root: str) -> list[tuple[str, str, object]]:
    """(section, parameter, value) of every flag Luigi parsed into ``known``; the root task's own flags
    (``--parts`` after FullWSSS) under its section."""
    given = []
    for section, _, name, param in Register.get_all_params():
        value = getattr(known, f"{section}_{name}", None)
        if value is not None and not (value is False and _is_switch(param)):
            given.append((section, name, value))
    for name, param in Register.get_task_cls(root).get_params():
        value = getattr(known, name, None)
        if value is not None and not (value is False and _is_switch(param)) \
                and getattr(known, f"{root}_{name}", None) in (None, False):
            given.append((root, name, value))
    return given


def _is_switch(param: luigi.Parameter) -> bool:
    """A flag without a value (``--parts``; argparse stores False when it is absent)."""
    return isinstance(param, luigi.BoolParameter) and param.parsing == luigi.BoolParameter.IMPLICIT_PARSING


def _text(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def overrides_of(known: argparse.Namespace, root: str) -> list[list[str]]:
    """The flags of ``known`` that can change what runs, as ``[flag, value]`` (``[flag]`` for a switch) in their
    global spelling: every task parameter; not Luigi's own settings nor ``[wsss]`` (configuration classes)."""
    params = {(section, name): param for section, _, name, param in Register.get_all_params()}
    return sorted([_flag(section, name)] if _is_switch(params[section, name]) else [_flag(section, name), _text(value)]
                  for section, name, value in _given(known, root)
                  if not issubclass(Register.get_task_cls(section), luigi.Config))


def _parse(args: Sequence[str], root: str) -> argparse.Namespace:
    """Luigi's parse of ``root args``; a flag Luigi does not know, or a value its parameter cannot read, is a
    :class:`UsageError` naming it."""
    known, unknown = CmdlineParser._build_parser(root_task=root).parse_known_args([root, *args])
    if unknown:
        raise UsageError(f"unrecognized argument(s) {' '.join(unknown)}: not a flag `luigi --module pipeline {root}` "
                         "takes (its --help-all lists them all)")
    for section, name, value in _given(known, root):
        param = dict(Register.get_task_cls(section).get_params())[name]
        try:
            param.parse(value)
        except Exception as err:  # each Parameter class raises its own kind
            raise UsageError(f"{_flag(section, name)} {_text(value)}: not a valid value ({err})") from None
    return known


@contextlib.contextmanager
def command_line(args: Sequence[str], root: str = ROOT) -> Iterator[CmdlineParser]:
    """Tasks built inside see ``args`` as they would after ``luigi --module pipeline <root>``."""
    known = _parse(args, root)
    with CmdlineParser.global_instance([root, *args], allow_override=True) as parser:
        for section, name, value in _given(known, root):  # the root's own flags apply to every instance of it
            setattr(parser.known_args, f"{section}_{name}", value)
        Register.clear_instance_cache()
        try:
            yield parser
        finally:
            Register.clear_instance_cache()


# ------------------------------------------------------------------------------------------------ the record

def read_last_run(work_dir: Path) -> dict | None:
    """``<work_dir>/last_run.json``, or None when no run recorded one (a damaged file is a BadInputError)."""
    path = work_dir / LAST_RUN
    return read_json(path) if path.is_file() else None  # type: ignore[return-value]


def record_run(root: luigi.Task, overrides: list[list[str]]) -> Path:
    """Write ``<work_dir>/last_run.json`` for the run scheduled from ``root`` (atomically); the record it replaces
    joins its ``earlier`` runs (those within :data:`RECENT_S`)."""
    work_dir = Path(runtime().work_dir)
    now = time.time()
    try:
        previous = read_last_run(work_dir)
    except BadInputError:  # a damaged record is replaced
        previous = None
    earlier = [] if previous is None else [
        {k: previous.get(k) for k in ("time", "overrides", "preset", "stages")}, *previous.get("earlier", [])]
    record = {"time": now, "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)),
              "root": root.get_task_family(), "overrides": overrides,
              "preset": os.environ.get("LUIGI_CONFIG_PATH", ""), "files": [str(p) for p in loaded_files()],
              "stages": {name: {"stage": task.get_task_family(), "key": task.key}
                         for name, task in stage_graph([root]).items()},
              "earlier": [run for run in earlier if now - run["time"] < RECENT_S][:EARLIER_RUNS]}
    write_json(work_dir / LAST_RUN, record)
    return work_dir / LAST_RUN


_recorded = False


def _record_once(task: luigi.Task, *_: object) -> None:
    """Luigi event handler: record the run when its root task is scheduled (found complete, its dependencies found,
    or started), once per process."""
    global _recorded
    parser = CmdlineParser.get_instance()
    if _recorded or parser is None or task.get_task_family() != parser.known_args.root_task \
            or not isinstance(task, (StageTask, FullWSSS)) or task.task_id != parser.get_task_obj().task_id:
        return
    _recorded = True
    try:
        path = record_run(task, overrides_of(parser.known_args, task.get_task_family()))
        logger.info("recorded this run in %s", path)
    except Exception as err:  # a graph that cannot be built fails the run while scheduling, saying why
        logger.info("%s not written: %r", LAST_RUN, err)


for _event in (luigi.Event.DEPENDENCY_DISCOVERED, luigi.Event.DEPENDENCY_PRESENT, luigi.Event.START):
    luigi.Task.event_handler(_event)(_record_once)


# ------------------------------------------------------------------------------------ which run is shown

def preset_name(files: Sequence[str | Path]) -> str:
    """The preset a list of configuration files amounts to: the last one read (after the project's luigi.cfg)."""
    presets = [Path(p) for p in files if Path(p).resolve() != PROJECT_CFG]
    return describe(presets[-1]) if presets else describe(PROJECT_CFG)


def describe_run(record: dict) -> str:
    flags = " ".join(" ".join(pair) for pair in record["overrides"])
    return f"{flags or 'no flags'} ({preset_name(record['files'])})"


def other_run_note(record: dict | None, overrides: list[list[str]]) -> str | None:
    """One line saying that the last recorded ``luigi`` run is not the configuration shown, or None."""
    if record is None:
        return None
    files = [str(p) for p in loaded_files()]
    if record["overrides"] == overrides and record["files"] == files:
        return None
    how = "pass the same flags" if record["files"] == files else \
        f"select {preset_name(record['files'])} (LUIGI_CONFIG_PATH) and pass the same flags"
    return (f"note: the last `luigi` run ({record['started']}) used {describe_run(record)}; this shows "
            f"{describe_run({'files': files, 'overrides': overrides})}: {how} (or --last) to see it")


@contextlib.contextmanager
def shown_run(args: Sequence[str], last: bool) -> Iterator[list[str]]:
    """The configuration an inspection command shows: ``args`` (luigi's flags) on the files in force, or with
    ``last`` the recorded run's flags and files. Yields the lines to print first (which run this is)."""
    if last and args:
        raise UsageError(f"--last shows the recorded run's flags; drop {' '.join(args)} or --last")
    check_configured_values()
    if not last:
        with command_line(args) as parser:
            note = other_run_note(read_last_run(Path(runtime().work_dir)), overrides_of(parser.known_args, ROOT))
            yield [note] if note and not overrides_of(parser.known_args, ROOT) else []
        return
    record = read_last_run(Path(runtime().work_dir))
    if record is None:
        raise UsageError(f"--last: no {Path(runtime().work_dir) / LAST_RUN} (written when `luigi` schedules a run)")
    with reading([Path(p) for p in record["files"]]), command_line([a for pair in record["overrides"] for a in pair]):
        yield [f"showing the last `luigi` run ({record['started']}): {describe_run(record)}"]


def recent_keys(record: dict | None, work_dir: Path) -> set[tuple[str, str]]:
    """(family, key) of every stage the last recorded run scheduled, and the runs recorded within
    :data:`RECENT_S` before it. A key still pending when recorded (an external dataset not prepared yet) is
    recomputed under the recorded configuration."""
    if record is None:
        return set()
    runs = [record, *(run for run in record.get("earlier", []) if record["time"] - run["time"] < RECENT_S)]
    keys = {(s["stage"], s["key"]) for run in runs for s in run["stages"].values()}
    if any(key.startswith(PENDING) for _, key in keys):
        try:
            with reading([Path(p) for p in record["files"]]), \
                    command_line([a for pair in record["overrides"] for a in pair], root=record["root"]) as parser:
                keys |= {(t.get_task_family(), t.key) for t in stage_graph([parser.get_task_obj()]).values()}
        except Exception as err:  # the record outlived its configuration files or its code
            logger.warning("gc: could not rebuild the last run's pending keys from %s (%r); keeping what it recorded",
                           work_dir / LAST_RUN, err)
    return {(family, key) for family, key in keys if not key.startswith(PENDING)}


# -------------------------------------------------------------------------------------------------- errors

def check_configured_values() -> None:
    """Every value the configuration files give a stage knob or a ``[wsss]`` setting parses as its parameter;
    else a :class:`ConfigurationError` naming the file, the section and the knob."""
    parser = luigi.configuration.get_config()
    origin = sources(loaded_files())
    for section in [*STAGE_CONFIGS, "wsss"]:
        if not parser.has_section(section):
            continue
        params = dict(Register.get_task_cls(section).get_params())
        for option in parser.options(section):
            if option not in params:
                continue
            value = parser.get(section, option)
            try:
                params[option].parse(value)
            except Exception as err:  # each Parameter class raises its own kind
                where = describe(origin[section, option]) if (section, option) in origin else "set in this process"
                raise ConfigurationError(f"{where}: [{section}] {option} = {value}: not a valid value ({err})") \
                    from None


def where_set(message: str, flags: Sequence[str]) -> str:
    """``message`` (a stage's refusal of its configuration, naming ``Section.knob``) with where each knob it names
    takes its value from: the command line, a file, or the code default."""
    origin = sources(loaded_files())
    places = []
    for section, knobs in all_knobs().items():
        for name in knobs:
            if f"{section}.{name}" in message:
                where = "the command line" if _flag(section, name) in flags else \
                    describe(origin[section, name]) if (section, name) in origin else "the default in stages/config.py"
                places.append(f"{section}.{name} from {where}")
    return f"{message} [{'; '.join(places)}]" if places else message

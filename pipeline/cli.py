"""``python -m pipeline``: inspect and manage the artifact cache without editing code.

Configuration comes from the same files as ``luigi`` (``./luigi.cfg`` then ``$LUIGI_CONFIG_PATH``), and ``status``,
``summary``, ``gc`` and ``clean`` take the flags ``luigi`` takes after the task (pipeline.command_line), so
``status --EvalCAM-bg-threshold 0.2`` shows exactly what ``luigi --module pipeline FullWSSS --EvalCAM-bg-threshold
0.2`` would reuse or run. Without flags they say when the last ``luigi`` run used others (``--last`` shows it).
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import json
import os
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import luigi

from data.artifacts import INPUTS_RECORD, PARTS_SUFFIX, PROVENANCE, RESUME_SUFFIX, TRAINING_LOG
from data.io import BadInputError, is_temporary, read_json, remove_path
from pipeline.command_line import (
    ConfigurationError,
    UsageError,
    check_configured_values,
    read_last_run,
    recent_keys,
    section_summary,
    shown_run,
    where_set,
)
from pipeline.presets import PresetError
from pipeline.settings import runtime
from pipeline.tasks import STAGES, downstream_of, stage_graph

TMP_MIN_AGE_S = 3600  # younger temporary paths may belong to a run in progress


def _stage_dirs(work_dir: Path, family: str) -> list[Path]:
    base = work_dir / family
    return sorted(p for p in base.iterdir()) if base.is_dir() else []


def cmd_status(args: argparse.Namespace) -> int:
    work_dir = Path(runtime().work_dir)
    print(f"work_dir: {work_dir.resolve()}")
    print(f"{'stage':<20} {'key':<18} {'state':<10} other keys on disk")
    graph = stage_graph()
    used: dict[str, set[str]] = {}  # a family can run twice in one graph (TrainSegmentation and its -gt ceiling)
    for task in graph.values():
        used.setdefault(task.get_task_family(), set()).add(task.key)
    pending = []
    for family, task in graph.items():
        done = task.complete()
        state = "cached" if done else ("partial" if task.stage_dir.with_name(task.key + PARTS_SUFFIX).exists()
                                       else "to run")
        others = {_key_of(p) for p in _stage_dirs(work_dir, task.get_task_family()) if not is_temporary(p)}
        print(f"{family:<20} {task.key:<18} {state:<10} {len(others - used[task.get_task_family()])}")
        if not done:
            pending.append(family)
    print("would run: " + (", ".join(pending) if pending else "nothing (everything is cached)"))
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    graph = stage_graph()
    if args.stage not in graph:
        print(f"unknown stage {args.stage!r}; stages: {', '.join(graph)}", file=sys.stderr)
        return 2
    families = downstream_of(args.stage) if args.downstream else [args.stage]
    removed = 0
    for family in families:
        task = graph[family]
        for path in (task.stage_dir, task.stage_dir.with_name(task.key + PARTS_SUFFIX)):
            if path.exists():
                print(("would remove " if args.dry_run else "removing ") + str(path))
                removed += 1
                if not args.dry_run:
                    remove_path(path)
    if not removed:
        print("nothing cached for " + ", ".join(families))
    return 0


def _newest_mtime(path: Path) -> float:
    """When anything under ``path`` last changed (a resuming run touches its newest checkpoint or shard)."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for folder, dirs, files in os.walk(path):
            for name in dirs + files:
                with contextlib.suppress(FileNotFoundError):
                    newest = max(newest, os.lstat(os.path.join(folder, name)).st_mtime)
    return newest


def _inputs_of(path: Path) -> list[tuple[str, str]]:
    """The (family, key) directories the work in ``path`` reads: a published stage's provenance, or the record an
    unfinished one (``.parts``, ``.resume``) keeps."""
    record = path / (INPUTS_RECORD if path.name.endswith((PARTS_SUFFIX, RESUME_SUFFIX)) else PROVENANCE)
    try:
        inputs = read_json(record).get("inputs", {})
    except (BadInputError, AttributeError):
        return []
    return [(i["stage"], i["key"]) for i in inputs.values() if isinstance(i, dict) and {"stage", "key"} <= i.keys()]


def _key_of(path: Path) -> str:
    return path.name.removesuffix(PARTS_SUFFIX).removesuffix(RESUME_SUFFIX)


def cmd_gc(args: argparse.Namespace) -> int:
    """Remove temporary debris and stage directories the current configuration does not reference.

    Kept whatever their key: temporary paths and unfinished work (``.parts``, ``.resume``) touched within
    ``--min-age`` seconds (a run, perhaps under another configuration, may own them); unless ``--force``, every
    directory of the last recorded ``luigi`` run and of those recorded within a day before it (``last_run.json``);
    and every directory that kept work reads (transitively, from provenance and the unfinished work's
    ``inputs.json``).
    """
    work_dir = Path(runtime().work_dir)
    live = {(task.get_task_family(), task.key) for task in stage_graph().values()}
    recent = set() if args.force else recent_keys(read_last_run(work_dir), work_dir)
    now = time.time()
    entries = [(family, path) for family in [cls.get_task_family() for cls in STAGES]
               for path in _stage_dirs(work_dir, family)]
    young = {path for _, path in entries if (is_temporary(path) or path.name.endswith((PARTS_SUFFIX, RESUME_SUFFIX)))
             and now - _newest_mtime(path) < args.min_age}
    victims = _unused(entries, young, live | recent, args, now)
    spared = len(_unused(entries, young, live, args, now)) - len(victims)
    for path in victims:
        print(("would remove " if args.dry_run else "removing ") + str(path))
        if not args.dry_run:
            remove_path(path)
    print(f"{len(victims)} path(s) {'to remove' if args.dry_run else 'removed'}")
    if spared:
        print(f"keeping {spared} path(s) that recent `luigi` runs used (recorded in {work_dir / 'last_run.json'}); "
              "--force removes them too")
    return 0


def _unused(entries: list[tuple[str, Path]], young: set[Path], kept: set[tuple[str, str]],
            args: argparse.Namespace, now: float) -> list[Path]:
    """What gc removes when the (family, key) directories ``kept`` stay, with every directory their work reads."""
    kept_keys = set(kept)
    kept_keys |= {(family, _key_of(path)) for family, path in entries if path in young and not is_temporary(path)}
    if args.keep_unreferenced:
        kept_keys |= {(family, _key_of(path)) for family, path in entries if not is_temporary(path)}
    by_key: dict[tuple[str, str], list[Path]] = {}
    for family, path in entries:
        if not is_temporary(path):
            by_key.setdefault((family, _key_of(path)), []).append(path)
    todo = list(kept_keys)
    while todo:  # what kept work reads is kept
        for path in by_key.get(todo.pop(), []):
            for ref in _inputs_of(path):
                if ref not in kept_keys:
                    kept_keys.add(ref)
                    todo.append(ref)
    victims = []
    for family, path in entries:
        if path in young:
            continue
        if is_temporary(path) or (family, _key_of(path)) not in kept_keys:
            victims.append(path)
        elif path.name.endswith(PARTS_SUFFIX):  # shards of a kept key: resumable work, but debris inside
            victims += [p for p in path.iterdir() if is_temporary(p) and now - _newest_mtime(p) >= args.min_age]
    return victims


def cmd_summary(args: argparse.Namespace) -> int:
    from stages.report.html import stage_seconds

    print(f"{'stage':<20} {'key':<18} {'seconds':>8}  metrics (seconds: a sharded stage's summed over its shards)")
    footer, fitted = [], []
    segmentation: dict[str, float] = {}
    for family, task in stage_graph().items():
        if not task.complete():
            print(f"{family:<20} {task.key:<18} {'-':>8}  (not computed)")
            continue
        prov = read_json(task.stage_dir / PROVENANCE)
        metrics = prov.get("metrics", {})
        fitted += fitted_lines(family, prov)
        shown = ", ".join(f"{k}={len(v) if isinstance(v, list) else _fmt(v)}" for k, v in metrics.items()
                          if not isinstance(v, dict))
        print(f"{family:<20} {task.key:<18} {stage_seconds(prov):>8.1f}  {shown}")
        if family == "EvalCAM":
            footer.append(f"CAM mIoU: {100 * metrics['miou']:.2f} at background threshold "
                          f"{metrics['threshold']:.2f} (GT-tuned best {100 * metrics['best_miou']:.2f} at "
                          f"{metrics['best_threshold']:.2f}); curve: {task.stage_dir / 'curve.png'}")
        if family == "EvalPseudoLabels":
            chain = metrics["chain"]
            footer.append(f"Chain mIoU: CAM {100 * chain['cam_miou']:.2f} -> seeds {100 * chain['seed_miou']:.2f} "
                          f"(on the {100 * chain['seed_labelled_fraction']:.1f}% labelled pixels) -> pseudo labels "
                          f"{100 * chain['pseudo_label_miou']:.2f} -> after the CRF {100 * chain['refined_miou']:.2f}")
        if family in ("TrainSegmentation", "TrainSegmentation-gt") and metrics.get("train_miou") is not None:
            footer.append(f"{family} at the end of training, single scale: train mIoU {100 * metrics['train_miou']:.2f}"
                          f" on its training labels, val {100 * metrics['val_miou']:.2f}{val_trend(task.stage_dir)}")
        if family in ("EvalSegmentation", "EvalSegmentation-gt"):
            who = "pseudo labels" if family == "EvalSegmentation" else "GT (fully supervised ceiling)"
            footer.append(f"DeepLab trained on {who}: val mIoU {100 * metrics['miou']:.2f} "
                          f"({100 * metrics['miou_no_crf']:.2f} before the CRF)")
            segmentation[family] = metrics["miou"]
            if len(segmentation) == 2 and segmentation["EvalSegmentation-gt"] > 0:
                ratio = segmentation["EvalSegmentation"] / segmentation["EvalSegmentation-gt"]
                footer.append(f"DeepLab / ceiling: {100 * ratio:.1f}% of the fully supervised val mIoU")
        if family == "Report":
            footer += compared_methods(task.stage_dir / "report.md")
            footer += cooccurrence_flag(metrics)
            footer.append(f"Report: {task.stage_dir / 'report.html'}")
    footer = fitted + footer
    print("\n" + "\n".join(footer) if footer else "")
    return 0


def val_trend(stage_dir: Path) -> str:
    """`` (val +x.x in the last y% of training: converged)`` from a trained stage's log, or ``""``."""
    from stages.report.build import read_curve
    from stages.report.html import val_trend as trend_of
    log = stage_dir / TRAINING_LOG
    trend = trend_of(read_curve(log)) if log.is_file() else ""
    return f" (val {trend})" if trend else ""


def fitted_lines(family: str, provenance: dict) -> list[str]:
    """A stage's ``auto`` knobs as resolved for the data, and its warnings for hand-set ones (stages/auto.py)."""
    record = provenance.get("fitted") or {}
    knobs = ", ".join(f"{knob} = {r['value']} ({r['set']})" for knob, r in record.get("knobs", {}).items())
    return ([f"Fitted to the data: {family} {knobs}"] if knobs else []) + [
        f"Warning: {family}: {w}" for w in record.get("warnings", [])]


def compared_methods(report_md: Path) -> list[str]:
    """The report's tables of compared methods (``Report.compare``) and part runs (``Report.parts_compare``), as
    printed there, or nothing."""
    text = report_md.read_text() if report_md.is_file() else ""
    lines = []
    for heading, title in (("## Propagation methods compared", "Methods compared (report.md):"),
                           ("## Part segmentation (GMNet)", "Part runs compared (report.md):")):
        if heading in text:
            section = text.split(heading, 1)[1].split("\n## ", 1)[0]
            # the first table only (the parts section's per-part IoU table follows its own line)
            table = section.split("\n\n|", 1)[1].split("\n\n", 1)[0] if "\n\n|" in section else ""
            lines += [title, *("|" + table).splitlines()]
    return lines


def cooccurrence_flag(report_metrics: dict) -> list[str]:
    """The classes the report flags as having learned their context, with their pseudo-label pixels' share on GT
    background (``[Report] cooccurrence_flag``); nothing for a report without the measure."""
    if "cooccurrence_flagged" not in report_metrics:
        return []
    shares = report_metrics.get("cooccurrence_on_background") or {}
    flagged = [f"{name} ({100 * shares[name]:.1f}% of its pseudo-label pixels on GT background)"
               if shares.get(name) is not None else name for name in report_metrics["cooccurrence_flagged"]]
    return [f"Co-occurrence flag (report): {'; '.join(flagged) if flagged else 'no class'}"]


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _cfg_text(value: object) -> str:
    """A default as a luigi.cfg value: tuples as JSON lists, booleans in lower case."""
    if isinstance(value, tuple):
        return json.dumps(list(value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def _cfg_line(name: str, text: str) -> str:
    """``name = text`` as a configuration file holds it: '%' doubled (Luigi interpolates), the lines of a multi-line
    value indented (so that they continue it)."""
    return f"{name} = " + text.replace("%", "%%").replace("\n", "\n    ")


def _comment(text: str) -> list[str]:
    return [f"# {line}" for line in textwrap.wrap(text, 114)]


def cmd_config(args: argparse.Namespace) -> int:
    """The configuration in force (or the code defaults) as a valid luigi.cfg, each knob preceded by what it does
    (stages.config.knob_help) and where its value comes from."""
    from pipeline.presets import describe, effective, loaded_files
    from stages.config import STAGE_CONFIGS, RuntimeConfig, all_knobs, knob_help

    docs = knob_help()
    sections = {"wsss": RuntimeConfig, **STAGE_CONFIGS}
    if args.defaults:
        table = {section: {name: (value, "default") for name, value in knobs.items()}
                 for section, knobs in all_knobs().items()}
        print("# Every knob with its default in stages/config.py (the code; the demo preset changes some of them, and")
        print("# TrainSegmentation.freeze_bn needs pretrained weights: `config` without --defaults is a runnable set).")
    else:
        table = effective()
        print(*_comment("The configuration in force, as a luigi.cfg (save it and point LUIGI_CONFIG_PATH at it to "
                        "run the same). Files read, later ones overriding earlier ones: "
                        + ", ".join(describe(p) for p in loaded_files())
                        + ". In brackets: the file a value comes from (default = stages/config.py); values given "
                        "on a luigi command line are not included."), sep="\n")
    print()
    for section, rows in table.items():
        if section in sections:
            print(*_comment(f"[{section}]: {section_summary(sections[section])}"), sep="\n")
        print(f"[{section}]")
        for name, (value, where) in rows.items():
            about = docs.get(section, {}).get(name, "")
            print(*_comment(f"{about} [{where}]" if about else f"[{where}]"), sep="\n")
            print(_cfg_line(name, _cfg_text(value) if where == "default" else str(value)))
        print()
    return 0


def cmd_make_dataset(args: argparse.Namespace) -> int:
    from data.synthetic import PROFILES, write_dataset
    if args.profile not in PROFILES:
        print(f"unknown profile {args.profile!r}; choose from {', '.join(PROFILES)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists():
        print(f"{out}: already exists; choose a new directory", file=sys.stderr)
        return 2
    write_dataset(out, args.profile, args.seed, processes=args.processes)
    p = PROFILES[args.profile]
    print(f"wrote {p.n_train} train + {p.n_val} val images ({p.height}x{p.width}) to {out}")
    return 0


INSPECTING = ("status", "clean", "gc", "summary")   # commands that take luigi's flags and show one run
RUN_FLAGS = ("Takes the flags `luigi --module pipeline FullWSSS` takes after the task, to see the run they make: "
             "stage knobs (--EvalCAM-bg-threshold 0.2, --TrainCAM-lr 0.1: `luigi --module pipeline FullWSSS "
             "--help-all` lists them) and runtime flags (--workers 2, --local-scheduler, --no-lock; no effect here). "
             "Without knob flags it says when the last `luigi` run used other ones; --last shows that run.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Inspect and manage the artifact cache without editing code. Reads the same configuration "
                    "as luigi (./luigi.cfg, then $LUIGI_CONFIG_PATH); status, summary, gc and clean also take "
                    "luigi's command-line flags (--EvalCAM-bg-threshold 0.2) or --last.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def inspecting(name: str, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text, description=f"{help_text}. {RUN_FLAGS}", allow_abbrev=False)
        command.add_argument("--last", action="store_true",
                             help="the flags and preset of the last `luigi` run (<work_dir>/last_run.json)")
        return command

    inspecting("status", "what is cached and what would run").set_defaults(fn=cmd_status)
    clean = inspecting("clean", "delete a stage's current artifacts to force a rerun")
    clean.add_argument("--stage", required=True, help="stage name, e.g. MakeCAM")
    clean.add_argument("--downstream", action="store_true", help="also every stage that depends on it")
    clean.add_argument("--dry-run", action="store_true")
    clean.set_defaults(fn=cmd_clean)
    gc = inspecting("gc", "remove temporary debris and artifacts the current config does not use")
    gc.add_argument("--dry-run", action="store_true")
    gc.add_argument("--keep-unreferenced", action="store_true", help="only remove temporary debris")
    gc.add_argument("--min-age", type=float, default=TMP_MIN_AGE_S,
                    help="seconds a temporary path must be old before removal (a run may own younger ones)")
    gc.add_argument("--force", action="store_true",
                    help="also remove the directories of the last `luigi` run and of those recorded within a day "
                         "before it (kept otherwise)")
    gc.set_defaults(fn=cmd_gc)
    inspecting("summary", "metrics of every computed stage").set_defaults(fn=cmd_summary)
    config = sub.add_parser("config", help="print the configuration in force as a luigi.cfg, every knob described",
                            description="Print the configuration in force as a valid luigi.cfg: every knob with its "
                                        "value, what it does and the file the value comes from.")
    config.add_argument("--defaults", action="store_true", help="the code defaults of stages/config.py instead")
    config.add_argument("--effective", action="store_true", help="the values in force (what it prints anyway)")
    config.set_defaults(fn=cmd_config)
    make = sub.add_parser("make-dataset", help="write the embedded synthetic dataset for inspection")
    make.add_argument("--profile", default="demo")
    make.add_argument("--out", required=True)
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--processes", type=int, default=1)
    make.set_defaults(fn=cmd_make_dataset)
    return parser


def _inspect(args: argparse.Namespace, flags: Sequence[str]) -> int:
    with shown_run(flags, args.last) as header:
        try:
            check_configured_values()
            for line in header:
                print(line)
            return args.fn(args)
        except (ValueError, configparser.Error, luigi.parameter.ParameterException) as err:
            if isinstance(err, (UsageError, BadInputError, ConfigurationError)):
                raise
            raise ConfigurationError(where_set(str(err), flags)) from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, flags = parser.parse_known_args(argv)
    if flags[:1] == ["FullWSSS"]:  # a pasted `luigi ... FullWSSS <flags>` keeps its task name
        flags = flags[1:]
    if flags and args.command not in INSPECTING:
        parser.error(f"unrecognized arguments: {' '.join(flags)}")
    try:
        return _inspect(args, flags) if args.command in INSPECTING else args.fn(args)
    except UsageError as err:
        print(f"python -m pipeline {args.command}: {err}", file=sys.stderr)
        return 2
    except (ConfigurationError, PresetError, BadInputError) as err:
        print(f"python -m pipeline {args.command}: error: {err}", file=sys.stderr)
        return 1

"""``python -m pipeline``: inspect and manage the artifact cache without editing code.

Configuration comes from the same files as ``luigi`` (``./luigi.cfg`` then ``$LUIGI_CONFIG_PATH``), so
``status`` shows exactly what ``luigi --module pipeline FullWSSS`` would reuse or run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

from data.artifacts import INPUTS_RECORD, PARTS_SUFFIX, PROVENANCE, RESUME_SUFFIX
from data.io import BadInputError, is_temporary, read_json, remove_path
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
    pending = []
    for family, task in stage_graph().items():
        done = task.complete()
        state = "cached" if done else ("partial" if task.stage_dir.with_name(task.key + PARTS_SUFFIX).exists()
                                       else "to run")
        others = [p for p in _stage_dirs(work_dir, task.get_task_family()) if p.name != task.key and not is_temporary(p)
                  and not p.name.endswith(PARTS_SUFFIX)]
        print(f"{family:<20} {task.key:<18} {state:<10} {len(others)}")
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
    ``--min-age`` seconds (a run, perhaps under another configuration, may own them), and every directory that
    kept work reads (transitively, from provenance and the unfinished work's ``inputs.json``).
    """
    work_dir = Path(runtime().work_dir)
    live = {(task.get_task_family(), task.key) for task in stage_graph().values()}
    now = time.time()
    entries = [(family, path) for family in [cls.get_task_family() for cls in STAGES]
               for path in _stage_dirs(work_dir, family)]
    young = {path for _, path in entries if (is_temporary(path) or path.name.endswith((PARTS_SUFFIX, RESUME_SUFFIX)))
             and now - _newest_mtime(path) < args.min_age}
    kept_keys = set(live)
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
    for path in victims:
        print(("would remove " if args.dry_run else "removing ") + str(path))
        if not args.dry_run:
            remove_path(path)
    print(f"{len(victims)} path(s) {'to remove' if args.dry_run else 'removed'}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from stages.report.html import stage_seconds

    print(f"{'stage':<20} {'key':<18} {'seconds':>8}  metrics (seconds: a sharded stage's summed over its shards)")
    footer = []
    segmentation: dict[str, float] = {}
    for family, task in stage_graph().items():
        if not task.complete():
            print(f"{family:<20} {task.key:<18} {'-':>8}  (not computed)")
            continue
        prov = read_json(task.stage_dir / PROVENANCE)
        metrics = prov.get("metrics", {})
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
    print("\n" + "\n".join(footer) if footer else "")
    return 0


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
    """A default as a luigi.cfg value: tuples as JSON-style lists, booleans in lower case."""
    value = list(value) if isinstance(value, tuple) else value
    return str(value).lower() if isinstance(value, bool) else str(value)


def cmd_config(args: argparse.Namespace) -> int:
    if args.effective:
        return _print_effective()
    from stages.config import all_knobs
    for section, knobs in all_knobs().items():
        print(f"[{section}]")
        for name, default in knobs.items():
            print(f"{name} = {_cfg_text(default)}")
        print()
    return 0


def _print_effective() -> int:
    """Every knob (and every other section read) with the value in force and the file it comes from."""
    from pipeline.presets import describe, effective, loaded_files
    print("# files read, in order (later ones override earlier ones): "
          + ", ".join(describe(p) for p in loaded_files()))
    print("# `default` = stages/config.py; values given on a luigi command line are not shown")
    for section, rows in effective().items():
        print(f"[{section}]")
        for name, (value, where) in rows.items():
            text = _cfg_text(value) if where == "default" else str(value)
            print(f"{name} = {text}".ljust(40) + f"  # {where}")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("status", help="what is cached and what would run").set_defaults(fn=cmd_status)
    clean = sub.add_parser("clean", help="delete a stage's current artifacts to force a rerun")
    clean.add_argument("--stage", required=True, help="stage name, e.g. MakeCAM")
    clean.add_argument("--downstream", action="store_true", help="also every stage that depends on it")
    clean.add_argument("--dry-run", action="store_true")
    clean.set_defaults(fn=cmd_clean)
    gc = sub.add_parser("gc", help="remove temporary debris and artifacts the current config does not use")
    gc.add_argument("--dry-run", action="store_true")
    gc.add_argument("--keep-unreferenced", action="store_true", help="only remove temporary debris")
    gc.add_argument("--min-age", type=float, default=TMP_MIN_AGE_S,
                    help="seconds a temporary path must be old before removal (a run may own younger ones)")
    gc.set_defaults(fn=cmd_gc)
    sub.add_parser("summary", help="metrics of every computed stage").set_defaults(fn=cmd_summary)
    config = sub.add_parser("config", help="print every knob with its default")
    config.add_argument("--effective", action="store_true",
                        help="the values in force instead (./luigi.cfg, $LUIGI_CONFIG_PATH and the bases it names) "
                             "and the file each comes from")
    config.set_defaults(fn=cmd_config)
    make = sub.add_parser("make-dataset", help="write the embedded synthetic dataset for inspection")
    make.add_argument("--profile", default="demo")
    make.add_argument("--out", required=True)
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--processes", type=int, default=1)
    make.set_defaults(fn=cmd_make_dataset)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)

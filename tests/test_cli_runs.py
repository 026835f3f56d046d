"""The commands around a run see the run (issue 21): ``status``, ``summary``, ``gc`` and ``clean`` take luigi's
flags and know the last run ``luigi`` recorded; every knob has help on the command line, from the comments beside
it in stages/config.py; ``config`` prints a configuration that runs the same keys."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import TINY_CFG, luigi_cmd, run_cli

from data.artifacts import PROVENANCE
from data.io import write_json
from pipeline import cli
from pipeline.command_line import LAST_RUN, command_line, record_run
from pipeline.tasks import EvalCAM, FullWSSS, Report, TrainSegmentation
from stages.config import STAGE_CONFIGS, all_knobs, knob_help

PIPELINE = [sys.executable, "-m", "pipeline"]
FLAG = ["--EvalCAM-bg-threshold", "0.2"]
# knobs across sections whose help --help-all must print: a trailing comment, a block above, a continued comment,
# a group heading, a new comment, a runtime setting
SAMPLE = [("EvalCAM", "sweep"), ("PrepareDataset", "max_pixels"), ("Propagate", "gcn_walk_steps"),
          ("TrainCAM", "seam_ecr_top"), ("TrainSegmentation", "accumulation"), ("Report", "compare"),
          ("wsss", "work_dir")]


def publish(task) -> Path:
    """A published stage directory for ``task`` (its provenance names its inputs, as a real run writes it)."""
    write_json(task.stage_dir / PROVENANCE, {"stage": task.get_task_family(), "key": task.key,
                                             "inputs": task.input_records()})
    return task.stage_dir


def table(out: str) -> dict[str, list[str]]:
    """``status`` rows: stage -> [key, state, other keys on disk]."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("stage ")) + 1
    rows = {}
    for line in lines[start:]:
        if line.startswith("would run:"):
            break
        stage, key, *state, others = line.split()
        rows[stage] = [key, " ".join(state), others]
    return rows


def squeezed(text: str) -> str:
    return "".join(text.split())


def test_every_knob_has_help_from_the_comments_beside_it():
    docs = knob_help()
    assert docs.keys() == all_knobs().keys()
    for section, knobs in all_knobs().items():
        assert docs[section].keys() == knobs.keys()
        assert [name for name, text in docs[section].items() if not text.strip()] == [], section
    assert docs["EvalCAM"]["sweep"] == "start, stop (inclusive), step"                      # trailing comment
    assert docs["PrepareDataset"]["max_pixels"].startswith("Larger images are refused")     # the block above
    assert docs["TrainSegmentation"]["model"].endswith("DeepLab-v3 + DDD's learned grid CRF)")   # continued
    assert docs["TrainCAM"]["seam_ecr_top"].startswith("SEAM only")   # a block ending in ':' heads its group...
    assert "SEAM" not in docs["TrainCAM"]["seed"]                      # ... up to the next block


def test_luigi_help_lists_the_stage_sections_and_help_all_describes_every_knob(tmp_path):
    short = run_cli([sys.executable, "-m", "luigi", "--module", "pipeline", "FullWSSS", "--help"], tmp_path).stdout
    assert "--help-all" in short.split("Stage sections", 1)[1]
    for section in [*STAGE_CONFIGS, "wsss"]:
        assert f"\n  {section} " in short, section
    every = squeezed(run_cli([sys.executable, "-m", "luigi", "--module", "pipeline", "FullWSSS", "--help-all"],
                             tmp_path).stdout)
    docs = knob_help()
    for section, knob in SAMPLE:
        flag = f"--{section}-{knob.replace('_', '-')} {section.upper()}_{knob.upper()}"
        assert squeezed(f"{flag} {docs[section][knob]} (default:") in every, (section, knob)


def test_the_pipeline_help_is_plain_text(capsys):
    for argv in (["--help"], ["status", "--help"], ["config", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        out = capsys.readouterr().out
        assert "``" not in out and "usage: python -m pipeline" in out


def test_status_takes_luigi_s_flags_and_names_one_it_does_not_know(luigi_config, capsys):
    assert cli.main(["status"]) == 0
    plain = table(capsys.readouterr().out)
    assert cli.main(["status", *FLAG, "--workers", "2", "--local-scheduler", "--no-lock"]) == 0
    flagged = table(capsys.readouterr().out)
    assert flagged["EvalCAM"][0] == EvalCAM(bg_threshold=0.2).key != plain["EvalCAM"][0]
    assert flagged["MakeCAM"] == plain["MakeCAM"] and flagged["Report"][0] != plain["Report"][0]
    assert cli.main(["status", "FullWSSS", *FLAG]) == 0   # a pasted `luigi ... FullWSSS <flags>`
    assert table(capsys.readouterr().out) == flagged
    assert cli.main(["summary", "--EvalCAM-bogus", "1"]) == 2
    assert "unrecognized argument(s) --EvalCAM-bogus 1" in capsys.readouterr().err
    assert cli.main(["gc", "--dry-run", "--EvalCAM-bg-threshold", "abc"]) == 2
    assert "--EvalCAM-bg-threshold abc: not a valid value" in capsys.readouterr().err
    assert cli.main(["clean", "--stage", "EvalCAM", "--dry-run", "--EvalCAM-sweep", "[0.5, 0.1, 0.01]"]) == 1
    err = capsys.readouterr().err
    assert "EvalCAM.sweep must be" in err and "[EvalCAM.sweep from the command line]" in err


def test_other_keys_on_disk_counts_the_keys_the_graph_does_not_use(luigi_config, capsys):
    """TrainSegmentation runs twice in one graph (pseudo labels and the GT ceiling): neither is the other's stray."""
    publish(TrainSegmentation())
    publish(TrainSegmentation(labels="gt"))
    cli.main(["status"])
    rows = table(capsys.readouterr().out)
    assert rows["TrainSegmentation"][1:] == rows["TrainSegmentation-gt"][1:] == ["cached", "0"]
    publish(TrainSegmentation(seed=5))
    cli.main(["status"])
    rows = table(capsys.readouterr().out)
    assert rows["TrainSegmentation"][2] == rows["TrainSegmentation-gt"][2] == "1"


def test_commands_name_the_last_run_and_gc_keeps_it_unless_forced(luigi_config, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # --last reads the recorded files alone, whose work_dir is ./work
    with command_line(FLAG):
        record_run(FullWSSS(), [FLAG])
        ran = publish(EvalCAM())
    shown = publish(EvalCAM())
    assert ran != shown

    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    note = out.splitlines()[0]
    assert note.startswith("note: the last `luigi` run") and "--EvalCAM-bg-threshold 0.2 (configs/tiny.cfg)" in note
    assert table(out)["EvalCAM"][:2] == [shown.name, "cached"]
    assert cli.main(["status", "--last"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("showing the last `luigi` run") and table(out)["EvalCAM"][:2] == [ran.name, "cached"]
    assert cli.main(["status", *FLAG]) == 0
    out = capsys.readouterr().out
    assert not out.startswith(("note", "showing")) and table(out)["EvalCAM"][0] == ran.name

    assert cli.main(["gc", "--min-age", "0"]) == 0
    assert ran.exists() and shown.exists()
    assert cli.main(["gc", "--min-age", "0", "--EvalCAM-bg-threshold", "0.3"]) == 0   # whatever the flags
    assert ran.exists() and not shown.exists()                                          # (not the shown graph's)
    assert "keeping 1 path(s) that recent `luigi` runs used" in capsys.readouterr().out
    assert cli.main(["gc", "--min-age", "0", "--force"]) == 0
    assert not ran.exists()


def test_luigi_records_the_run_it_schedules(luigi_config, tmp_path):
    """A run whose Report is already published schedules FullWSSS, runs nothing, and records itself."""
    with command_line(FLAG):
        report_key = Report().key
    write_json(tmp_path / "work" / "Report" / report_key / PROVENANCE, {"stage": "Report", "key": report_key})
    run_cli(luigi_cmd(*FLAG, "--workers", "2"), tmp_path)
    record = json.loads((tmp_path / "work" / LAST_RUN).read_text())
    assert record["root"] == "FullWSSS" and record["overrides"] == [FLAG]
    assert record["stages"]["Report"] == {"stage": "Report", "key": report_key}
    assert record["files"][-1] == str(TINY_CFG)
    assert run_cli([*PIPELINE, "summary"], tmp_path).stdout.startswith("note: the last `luigi` run")


def test_config_prints_a_valid_configuration_that_schedules_the_same_keys(tmp_path):
    printed = run_cli([*PIPELINE, "config"], tmp_path).stdout
    lines = printed.splitlines()
    at = lines.index("[EvalCAM]")
    assert lines[at + 1] == f"# {knob_help()['EvalCAM']['bg_threshold']} [default]"
    assert lines[at + 2].startswith("bg_threshold = ")
    saved = tmp_path / "saved.cfg"
    saved.write_text(printed)
    before = run_cli([*PIPELINE, "status"], tmp_path).stdout
    after = run_cli([*PIPELINE, "status"], tmp_path, env_extra={"LUIGI_CONFIG_PATH": str(saved)}).stdout
    assert table(after) == table(before)
    defaults = run_cli([*PIPELINE, "config", "--defaults"], tmp_path).stdout.splitlines()
    section = defaults[defaults.index("[PretrainBackbone]"):]
    assert "steps = 1500" in section[:section.index("")]


@pytest.mark.parametrize("bad, named", [("bg_threshold = abc", "[EvalCAM] bg_threshold = abc: not a valid value"),
                                        ("sweep = [0.5, 0.1, 0.01]", "EvalCAM.sweep from ")])
def test_status_under_an_invalid_configuration_says_which_file_and_knob(tmp_path, bad, named):
    preset = tmp_path / "bad.cfg"
    preset.write_text(f"[preset]\nbase = {TINY_CFG}\n\n[EvalCAM]\n{bad}\n")
    proc = run_cli([*PIPELINE, "status"], tmp_path, env_extra={"LUIGI_CONFIG_PATH": str(preset)}, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and named in proc.stderr and str(preset) in proc.stderr

"""Two runs computing the same key at once (two local schedulers, ``--no-lock``): the first to finish publishes, the
other keeps that result and says so, never suggesting to clean a healthy directory (issue 15, item 10)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import luigi
import pytest
from conftest import run_luigi

from data.artifacts import PROVENANCE
from data.io import is_temporary
from pipeline.framework import ShardedStage, StageTask
from pipeline.tasks import PrepareDataset

GATE = threading.Barrier(2, timeout=60)   # both publishers computed before either publishes
HELD = threading.Event()                  # the held shard publisher has started computing
RELEASE = threading.Event()               # ... and may go on


class RacedStage(StageTask):
    """A stage whose compute waits for a second publisher of the same key."""

    def compute(self, out_dir: Path) -> dict:
        GATE.wait()
        (out_dir / "result.txt").write_text(threading.current_thread().name)
        return {"images": 1}


class RacedShards(ShardedStage):
    """Two shards of one file per image; in the thread named ``held`` a shard waits until released."""

    shard_size = 4

    def upstream(self) -> dict[str, StageTask]:
        return {"dataset": PrepareDataset()}

    def compute_shard(self, ids, out_dir, writer, manifest, progress) -> dict:
        if threading.current_thread().name == "held":
            HELD.set()
            RELEASE.wait(60)
        elif threading.current_thread().name.startswith("both"):
            GATE.wait()
        for image_id in ids:
            (out_dir / f"{image_id}.txt").write_text(image_id)
        return {"images": len(ids)}


@pytest.fixture
def log_lines(caplog):
    caplog.set_level(logging.INFO, logger="luigi-interface")
    logging.getLogger("luigi-interface").addHandler(caplog.handler)
    yield lambda: caplog.text
    logging.getLogger("luigi-interface").removeHandler(caplog.handler)


def run_in_threads(targets: dict[str, object]) -> dict[str, BaseException | None]:
    """Run each callable in a thread of that name; what each raised (None: returned)."""
    raised: dict[str, BaseException | None] = {}

    def call(name, fn):
        try:
            fn()
            raised[name] = None
        except BaseException as err:
            raised[name] = err

    threads = [threading.Thread(target=call, args=(name, fn), name=name) for name, fn in targets.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return raised


def no_temporary_left(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if is_temporary(p)]


def test_two_publishers_of_one_stage_keep_the_first_and_say_so(luigi_config, tmp_path, log_lines):
    GATE.reset()
    task = RacedStage()
    raised = run_in_threads({"first": task.run, "second": task.run})
    assert raised == {"first": None, "second": None}, "the loser ends without an error: the result is there"
    assert (task.stage_dir / PROVENANCE).is_file() and task.complete()
    assert (task.stage_dir / "result.txt").read_text() in ("first", "second")
    assert no_temporary_left(tmp_path / "work"), "the loser's copy is removed"
    log = log_lines()
    assert "another run published" in log and "this run's copy discarded" in log
    assert "clean" not in log


def test_a_second_run_is_told_another_run_is_computing_it(luigi_config, tmp_path, log_lines):
    GATE.reset()
    task = RacedStage()
    building = task.stage_dir.with_name(task.key + ".tmp-0123456789")
    building.mkdir(parents=True)
    run_in_threads({"first": task.run, "other": GATE.wait})
    assert f"{building} exists: another run is computing this result now" in log_lines()


def test_a_foreign_directory_in_the_way_is_named_as_such(luigi_config, tmp_path):
    GATE.reset()
    task = RacedStage()
    task.stage_dir.mkdir(parents=True)
    (task.stage_dir / "stray.txt").write_text("")
    raised = run_in_threads({"first": task.run, "other": GATE.wait})
    assert isinstance(raised["first"], FileExistsError)
    assert f"{task.stage_dir}: a directory without {PROVENANCE} is in the way" in str(raised["first"])
    assert no_temporary_left(tmp_path / "work")


def test_two_publishers_of_one_shard_keep_the_first(luigi_config, tmp_path, log_lines):
    assert run_luigi(PrepareDataset()).status == luigi.LuigiStatusCode.SUCCESS
    GATE.reset()
    shard = RacedShards().shard_tasks()[0]
    raised = run_in_threads({"both-1": shard.run, "both-2": shard.run})
    assert raised == {"both-1": None, "both-2": None}
    assert shard.complete() and no_temporary_left(tmp_path / "work")
    assert "another run published" in log_lines() and "clean" not in log_lines()


def test_a_shard_whose_stage_another_run_published_meanwhile_ends_quietly(luigi_config, tmp_path, log_lines):
    """The winner joins the stage and removes its parts, with the loser's unfinished copy inside."""
    assert run_luigi(PrepareDataset()).status == luigi.LuigiStatusCode.SUCCESS
    HELD.clear()
    RELEASE.clear()
    stage = RacedShards()
    assert len(stage.shard_tasks()) > 1
    outcome: dict = {}
    held = threading.Thread(target=lambda: outcome.update(run_in_threads({"held": stage.shard_tasks()[0].run})))
    held.start()
    assert HELD.wait(60)
    assert run_luigi(stage).status == luigi.LuigiStatusCode.SUCCESS   # the other run, to the end
    assert stage.complete() and not stage.parts_dir.exists()
    RELEASE.set()
    held.join(60)
    assert outcome == {"held": None}, outcome
    assert "another run published" in log_lines() and "clean" not in log_lines()
    assert not stage.parts_dir.exists() or not list(stage.parts_dir.rglob("shard-*"))

"""``gc`` with two presets sharing one work directory: the other's unfinished work and what it reads stay while
young; old debris and unreferenced directories go (issue 15)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import luigi

from data.artifacts import PROVENANCE, RESUME_CHECKPOINT
from data.io import write_json
from pipeline.cli import cmd_gc
from pipeline.tasks import MakeCAM, PrepareDataset, TrainCAM


def age(path: Path, seconds: float) -> None:
    """Make ``path`` and everything under it look untouched for ``seconds``."""
    then = time.time() - seconds
    for folder, _, files in os.walk(path):
        for name in files:
            os.utime(os.path.join(folder, name), (then, then))
        os.utime(folder, (then, then))


def publish(task, seconds_old: float) -> Path:
    """A published stage directory for ``task`` (its provenance names its inputs, as a real run writes it)."""
    task.stage_dir.mkdir(parents=True)
    write_json(task.stage_dir / PROVENANCE, {"stage": task.get_task_family(), "key": task.key,
                                             "inputs": task.input_records()})
    age(task.stage_dir, seconds_old)
    return task.stage_dir


def gc(min_age: float = 3600) -> None:
    assert cmd_gc(argparse.Namespace(dry_run=False, keep_unreferenced=False, min_age=min_age, force=False)) == 0


def test_gc_keeps_another_presets_young_work_and_what_it_reads(luigi_config):
    hour = 3600
    # Preset B (another seed): a TrainCAM run in progress and a MakeCAM with finished shards, both touched just now,
    # on B's own dataset, published two hours ago.
    luigi_config("PrepareDataset", "seed", 7)
    b_dataset = publish(PrepareDataset(), 2 * hour)
    b_train = TrainCAM()
    b_train.record_inputs(b_train.resume_dir)                   # what TrainingStage.run writes first
    (b_train.resume_dir / RESUME_CHECKPOINT).write_bytes(b"checkpoint")
    b_cam = MakeCAM()
    b_cam.record_inputs(b_cam.parts_dir)                       # what each shard writes first
    (b_cam.parts_dir / "shard-00000-of-00002").mkdir()
    # ... and an abandoned run of B, untouched for two hours.
    luigi_config("TrainCAM", "num_epochs", 9)
    stale = TrainCAM()
    stale.record_inputs(stale.resume_dir)
    age(stale.resume_dir, 2 * hour)

    # Preset A (the test preset): its dataset published; an old directory nobody reads; old and young temp debris.
    luigi_config("PrepareDataset", "seed", 0)
    luigi_config("TrainCAM", "num_epochs", 2)
    luigi.task_register.Register.clear_instance_cache()
    a_dataset = publish(PrepareDataset(), 2 * hour)
    orphan = publish(PrepareDataset(seed=99), 2 * hour)
    old_tmp = a_dataset.with_name("abc.tmp-0123456789")
    old_tmp.mkdir()
    age(old_tmp, 2 * hour)
    young_tmp = a_dataset.with_name("def.tmp-0123456789")
    young_tmp.mkdir()

    gc()
    for path in (b_train.resume_dir, b_cam.parts_dir, b_dataset, a_dataset, young_tmp):
        assert path.exists(), path
    for path in (stale.resume_dir, orphan, old_tmp):
        assert not path.exists(), path

    # Once B's work has sat an hour untouched, it and the dataset only it read go too; A's stays.
    age(b_train.resume_dir, 2 * hour)
    age(b_cam.parts_dir, 2 * hour)
    gc()
    assert not b_train.resume_dir.exists() and not b_cam.parts_dir.exists() and not b_dataset.exists()
    assert a_dataset.exists()


def test_a_young_resume_dir_is_kept_by_its_newest_file(luigi_config):
    train = TrainCAM(num_epochs=5)            # not the configuration's key
    train.record_inputs(train.resume_dir)
    checkpoint = train.resume_dir / RESUME_CHECKPOINT
    checkpoint.write_bytes(b"x")
    age(train.resume_dir, 7200)
    os.utime(checkpoint)                      # the run just wrote its newest checkpoint
    gc()
    assert checkpoint.exists()

"""Per-stage submission through submitit: a submitted stage publishes what an in-process run publishes."""

from __future__ import annotations

import json
import os
import shutil

import luigi
import numpy as np
import pytest
import torch
from conftest import run_luigi

from data.artifacts import MODEL_WEIGHTS
from pipeline.framework import submitted_families
from pipeline.settings import runtime
from pipeline.submit import JobFailedError, submitit_config
from pipeline.tasks import MakeCAM, MakeCAMShard, PrepareDataset, TrainCAM


def read_shard(part_dir) -> dict[str, dict[str, np.ndarray]]:
    from data.dense import DenseMapReader
    reader = DenseMapReader(sorted(part_dir.glob("*.h5")))
    arrays = {image_id: reader.read(image_id)[0] for image_id in sorted(reader.ids())}
    reader.close()
    return arrays


def test_submitted_stages_match_in_process_runs(luigi_config, tmp_path):

    # In-process reference.
    assert run_luigi(TrainCAM()).status == luigi.LuigiStatusCode.SUCCESS
    train = TrainCAM()
    reference = torch.load(train.stage_dir / MODEL_WEIGHTS, map_location="cpu", weights_only=True)
    shutil.rmtree(train.stage_dir)

    # TrainCAM as a job in a separate process (submitit's LocalExecutor): same key, same weights.
    luigi_config("wsss", "submit_stages", "TrainCAM")
    luigi_config("submitit", "cluster", "local")
    luigi_config("submitit", "timeout_min", 10)
    assert run_luigi(TrainCAM()).status == luigi.LuigiStatusCode.SUCCESS
    train = TrainCAM()
    submitted = torch.load(train.stage_dir / MODEL_WEIGHTS, map_location="cpu", weights_only=True)
    assert reference.keys() == submitted.keys()
    for name, tensor in reference.items():
        assert torch.equal(tensor, submitted[name]), name
    provenance = json.loads((train.stage_dir / "provenance.json").read_text())
    assert provenance["job"]["cluster"] == "local" and provenance["job"]["id"].isdigit()
    assert provenance["key"] == train.key and provenance["metrics"]
    assert (tmp_path / "work" / ".submitit" / "TrainCAM").is_dir(), "job logs under <work_dir>/.submitit"
    assert not list(train.stage_dir.parent.glob("*.tmp-*"))

    # One MakeCAM shard, in process and then as a job (the debug executor: inside this process).
    n_shards = len(MakeCAM().shards())
    shard = MakeCAMShard(shard=0, n_shards=n_shards, stage_key=MakeCAM().key)
    assert run_luigi(shard).status == luigi.LuigiStatusCode.SUCCESS
    part = shard.output().part
    reference_maps = read_shard(part)
    shutil.rmtree(part)
    luigi_config("wsss", "submit_stages", "TrainCAM,MakeCAMShard")
    luigi_config("submitit", "cluster", "debug")
    submitted = MakeCAMShard(shard=0, n_shards=n_shards, stage_key=MakeCAM().key)
    assert run_luigi(submitted).status == luigi.LuigiStatusCode.SUCCESS
    submitted_maps = read_shard(part)
    assert reference_maps.keys() == submitted_maps.keys() and reference_maps
    for image_id, arrays in reference_maps.items():
        assert arrays.keys() == submitted_maps[image_id].keys()
        for name, array in arrays.items():
            np.testing.assert_array_equal(array, submitted_maps[image_id][name])
    record = json.loads((part / f"{shard.name}.json").read_text())
    assert record["job"]["cluster"] == "debug"
    assert runtime().submit_stages == "TrainCAM,MakeCAMShard", "the debug job restored the parent's config"


def test_a_failing_job_fails_the_task_with_its_error(luigi_config, tmp_path):
    # A weights file that exists (scheduling checks that) but holds no weights: only the job, loading it, fails.
    bad = tmp_path / "bad-weights.pth"
    bad.write_bytes(b"not a torch file")
    luigi_config("TrainCAM", "pretrained", bad)
    assert run_luigi(PrepareDataset()).status == luigi.LuigiStatusCode.SUCCESS
    luigi_config("wsss", "submit_stages", "TrainCAM")
    luigi_config("submitit", "cluster", "local")
    luigi_config("submitit", "timeout_min", 5)
    with pytest.raises(JobFailedError, match=r"TrainCAM: local job \d+ failed") as err:
        TrainCAM().run()
    message = str(err.value)
    assert "bad-weights.pth: cannot load as a weights-only state dict" in message, "the job's own error"
    assert "stderr tail" in message and "_log.err" in message
    assert run_luigi(TrainCAM()).status == luigi.LuigiStatusCode.FAILED
    assert not (tmp_path / "work" / "TrainCAM").exists() or not list((tmp_path / "work" / "TrainCAM").iterdir()), \
        "nothing published, no temporary debris"


def test_bad_submission_settings_name_the_key(luigi_config):
    luigi_config("wsss", "submit_stages", "TrainCAM, NoSuchStage")
    with pytest.raises(ValueError, match=r"\[wsss\] submit_stages names 'NoSuchStage'"):
        submitted_families(runtime())
    luigi_config("submitit", "cluster", "pbs")
    with pytest.raises(ValueError, match=r"\[submitit\] cluster = 'pbs'"):
        submitit_config()
    luigi_config("submitit", "cluster", "slurm")
    luigi_config("submitit", "slurm_additional_parameters", "account=lab")
    with pytest.raises(ValueError, match=r"\[submitit\] slurm_additional_parameters is not JSON"):
        submitit_config()


def test_slurm_job_script(luigi_config, tmp_path, monkeypatch):
    """The sbatch script a Slurm submission would use (a fake srun on PATH; nothing is submitted)."""
    from pipeline.submit import make_executor

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    for option, value in [("cluster", "slurm"), ("slurm_partition", "gpu"), ("mem_gb", 32), ("cpus_per_task", 8),
                          ("timeout_min", 90), ("slurm_additional_parameters", '{"account": "lab", "qos": "high"}')]:
        luigi_config("submitit", option, value)
    luigi_config("wsss", "device", "auto")

    def sbatch_script() -> str:
        return make_executor(submitit_config(), TrainCAM())._executor._make_submission_file_text("run-it", "uid")

    script = sbatch_script()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32GB", "#SBATCH --time=90",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --account=lab", "#SBATCH --qos=high",
                 "#SBATCH --job-name=wsss-TrainCAM", "export PYTHONPATH="):
        assert line in script, line
    luigi_config("wsss", "device", "cpu")
    assert "--gpus-per-node" not in sbatch_script(), "a CPU run asks for no GPU"

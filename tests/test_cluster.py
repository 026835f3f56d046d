"""Several Luigi workers against a real ``luigid``; the one-allocation Slurm template run without Slurm."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TINY_CFG, luigi_cmd, run_cli
from PIL import Image

CLUSTER_CFG = REPO / "configs" / "cluster.cfg"
STAGES = ("PrepareDataset", "PretrainBackbone", "TrainCAM", "MakeCAM", "EvalCAM", "ExtractSeeds", "TrainAffinity",
          "Propagate", "RefineCRF", "EvalPseudoLabels", "TrainSegmentation", "EvalSegmentation", "Report")
SHARDED = ("MakeCAM", "ExtractSeeds", "Propagate", "RefineCRF", "EvalSegmentation")
# luigi logs "Worker(...) running   Family(params)" when it starts a task and "done      Family(...)" after.
RUNNING = re.compile(r"\) running   (\w+\(.*\))$", re.M)
TIMING = re.compile(r"seconds|_s$|per_s")
DONE = re.compile(r"\) done      (\w+\(.*\))$", re.M)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def merged_config(path: Path, files: list[Path], overrides: dict[str, dict[str, object]]) -> Path:
    """One luigi.cfg from several (luigi reads ./luigi.cfg plus a single $LUIGI_CONFIG_PATH)."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read([str(f) for f in files])
    for section, values in overrides.items():
        if not parser.has_section(section):
            parser.add_section(section)
        for key, value in values.items():
            parser.set(section, key, str(value))
    with open(path, "w") as f:
        parser.write(f)
    return path


def api(port: int, method: str, **data) -> dict:
    query = urllib.parse.urlencode({"data": json.dumps(data)})
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/{method}?{query}", timeout=5) as reply:
        return json.loads(reply.read())["response"]


class Scheduler:
    """A real ``luigid`` on loopback with the cluster preset, tuned so a dead worker's task moves within seconds."""

    def __init__(self, root: Path, worker_disconnect_delay: float = 60):
        self.port = free_port()
        self.root = root
        (root / "logs").mkdir(parents=True)  # luigid does not create its --logdir
        self.config = merged_config(root / "luigi.cfg", [REPO / "luigi.cfg", CLUSTER_CFG], {
            "scheduler": {"worker_disconnect_delay": worker_disconnect_delay, "retry_delay": 1, "retry_count": 3}})
        env = dict(os.environ, LUIGI_CONFIG_PATH=str(self.config))
        self.log = open(root / "luigid.out", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys, luigi.cmdline; luigi.cmdline.luigid(sys.argv[1:])",
             "--address", "127.0.0.1", "--port", str(self.port), "--logdir", str(root / "logs"),
             "--state-path", str(root / "state.pickle")],
            cwd=root, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while True:
            try:
                api(self.port, "task_list", status="", upstream_status="")
                return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"luigid did not answer on port {self.port}: "
                                       f"{(root / 'luigid.out').read_text()[-2000:]}") from None
                time.sleep(0.2)

    def tasks(self, status: str) -> dict:
        return api(self.port, "task_list", status=status, upstream_status="")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def luigid(tmp_path):
    # A killed worker's running task goes back to the pool after 5 s instead of a minute.
    scheduler = Scheduler(tmp_path / "luigid", worker_disconnect_delay=5)
    try:
        yield scheduler
    finally:
        scheduler.stop()


def worker_cwd(path: Path, port: int) -> Path:
    """A run directory whose luigi.cfg = repo defaults + tiny profile + cluster preset, work_dir inside it."""
    path.mkdir(parents=True)
    merged_config(path / "luigi.cfg", [REPO / "luigi.cfg", TINY_CFG, CLUSTER_CFG],
                  {"core": {"scheduler_port": port}, "wsss": {"work_dir": path / "work"},
                   # tiny shards take a fraction of a second: an idle worker must ask for work more often
                   "worker": {"wait_interval": 0.1, "wait_jitter": 0.1}})
    return path


def start_worker(cwd: Path, port: int, name: str) -> tuple[subprocess.Popen, Path]:
    log = cwd / f"{name}.log"
    env = dict(os.environ, PYTHONPATH=str(REPO), LUIGI_CONFIG_PATH=str(cwd / "luigi.cfg"))
    cmd = luigi_cmd("--scheduler-host", "127.0.0.1", "--scheduler-port", str(port), "--workers", "1")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    return proc, log


def wait_all(procs: list[subprocess.Popen], timeout: float = 900) -> list[int]:
    deadline = time.time() + timeout
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(max(1.0, deadline - time.time())))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    return codes


def stage_dirs(work: Path, stage: str) -> list[Path]:
    """Published directories of a stage: one, or two for the segmentation stages (pseudo labels and GT)."""
    dirs = sorted(p for p in (work / stage).iterdir() if not p.name.endswith(".parts") and ".tmp-" not in p.name)
    expected = 2 if stage in ("TrainSegmentation", "EvalSegmentation") else 1
    assert len(dirs) == expected, f"{stage}: expected {expected} published directories, found {dirs}"
    return dirs


def stage_dir(work: Path, stage: str) -> Path:
    return stage_dirs(work, stage)[0]


def without_timings(metrics: object) -> object:
    """Metrics minus wall-clock figures (``seconds``, ``shard_seconds``, ``images_per_s``...)."""
    if isinstance(metrics, dict):
        return {k: without_timings(v) for k, v in metrics.items() if not TIMING.search(k)}
    return metrics


def assert_same_outputs(reference: Path, other: Path) -> None:
    """Same keys, bit-identical dense maps, identical label PNGs and metric values in every stage."""
    from pipeline.framework import shard_store

    pairs = [(name, a, b) for name in STAGES for a, b in zip(stage_dirs(reference, name), stage_dirs(other, name))]
    for stage, ref_dir, other_dir in pairs:
        assert ref_dir.name == other_dir.name, f"{stage}: different keys"
        ref_metrics = without_timings(json.loads((ref_dir / "provenance.json").read_text())["metrics"])
        other_metrics = without_timings(json.loads((other_dir / "provenance.json").read_text())["metrics"])
        assert ref_metrics == other_metrics, stage
        if stage in SHARDED:
            ref_store, other_store = shard_store(ref_dir), shard_store(other_dir)
            index = json.loads((ref_dir / "index.json").read_text())["images"]
            assert index == json.loads((other_dir / "index.json").read_text())["images"]
            assert sorted(ref_store.ids()) == sorted(other_store.ids())
            for image_id in ref_store.ids():  # (irn seeds store no dense maps)
                ref_arrays, _ = ref_store.read(image_id)
                other_arrays, _ = other_store.read(image_id)
                assert ref_arrays.keys() == other_arrays.keys()
                for name in ref_arrays:
                    np.testing.assert_array_equal(ref_arrays[name], other_arrays[name], err_msg=f"{stage} {name}")
        pngs = sorted(p.relative_to(ref_dir) for p in ref_dir.rglob("labels/*.png"))
        assert pngs == sorted(p.relative_to(other_dir) for p in other_dir.rglob("labels/*.png"))
        for rel in pngs:
            ref_png, other_png = Image.open(ref_dir / rel), Image.open(other_dir / rel)
            np.testing.assert_array_equal(np.asarray(ref_png), np.asarray(other_png), err_msg=f"{stage} {rel}")
        for metrics in ref_dir.glob("metrics.json"):
            assert json.loads(metrics.read_text()) == json.loads((other_dir / metrics.name).read_text())


@pytest.fixture(scope="module")
def reference_work(tmp_path_factory) -> Path:
    """The whole tiny chain with one worker on the local scheduler."""
    cwd = tmp_path_factory.mktemp("reference")
    (cwd / "luigi.cfg").write_text((REPO / "luigi.cfg").read_text())
    run_cli(luigi_cmd("--workers", "1"), cwd)
    return cwd / "work"


def task_runs(log: Path) -> tuple[list[str], list[str]]:
    text = log.read_text()
    return RUNNING.findall(text), DONE.findall(text)


@pytest.mark.slow
def test_two_workers_share_the_graph_through_luigid(luigid, reference_work, tmp_path):
    cwd = worker_cwd(tmp_path / "run", luigid.port)
    env = {"LUIGI_CONFIG_PATH": str(cwd / "luigi.cfg")}
    # The manifest first, so that every worker schedules every shard statically.
    run_cli([sys.executable, "-m", "luigi", "--module", "pipeline", "PrepareDataset", "--no-lock",
             "--scheduler-port", str(luigid.port)], cwd, env_extra=env)
    workers = [start_worker(cwd, luigid.port, f"worker{i}") for i in range(2)]
    codes = wait_all([proc for proc, _ in workers])
    logs = [log.read_text() for _, log in workers]
    assert codes == [0, 0], "\n\n".join(text[-3000:] for text in logs)

    runs = [task_runs(log) for _, log in workers]
    started = [task for running, _ in runs for task in running]
    finished = [task for _, done in runs for task in done]
    assert sorted(started) == sorted(finished), "a task started and did not finish"
    assert len(started) == len(set(started)), f"a task ran twice: {sorted(started)}"
    families = {task.split("(")[0] for task in started}
    assert families == set(STAGES[1:]) | {"FullWSSS", *(f"{s}Shard" for s in SHARDED)}
    n_shards = sum(len(json.loads((d / "index.json").read_text())["shards"])
                   for s in SHARDED for d in stage_dirs(cwd / "work", s))
    assert sum(task.split("(")[0].endswith("Shard") for task in started) == n_shards
    for running, _ in runs:
        assert any(task.split("(")[0].endswith("Shard") for task in running), "a worker got no shard"
    assert not luigid.tasks("FAILED") and not luigid.tasks("PENDING") and not luigid.tasks("RUNNING")
    assert_same_outputs(reference_work, cwd / "work")


@pytest.mark.slow
def test_killed_worker_its_shard_is_retried_by_the_other(luigid, reference_work, tmp_path):
    cwd = worker_cwd(tmp_path / "run", luigid.port)
    env = {"LUIGI_CONFIG_PATH": str(cwd / "luigi.cfg")}
    for stage in ("PrepareDataset", "PretrainBackbone", "TrainCAM"):  # start at MakeCAM: copy what precedes it
        shutil.copytree(stage_dir(reference_work, stage), cwd / "work" / stage / stage_dir(reference_work, stage).name)
    # and the GT ceiling's branch (it needs only the pretraining): else a worker may take it before any shard
    for stage in ("TrainSegmentation", "EvalSegmentation"):
        (ceiling,) = [d for d in stage_dirs(reference_work, stage)
                      if json.loads((d / "provenance.json").read_text())["params"]["labels"] == "gt"]
        shutil.copytree(ceiling, cwd / "work" / stage / ceiling.name)
    workers = [start_worker(cwd, luigid.port, name) for name in ("worker0", "worker1")]
    try:
        # The victim is whichever worker starts a MakeCAM shard first: which one luigid hands the shards to
        # depends on how fast each starts, and a loaded machine can give every shard to either.
        deadline, victims = time.time() + 300, []
        while not victims:
            victims = [i for i, (_, log) in enumerate(workers) if "running   MakeCAMShard" in log.read_text()]
            assert all(proc.poll() is None for proc, _ in workers), "a worker exited before any shard ran"
            assert time.time() < deadline, "no worker started a MakeCAM shard"
            time.sleep(0.01)
        (victim, victim_log), (survivor, survivor_log) = workers[victims[0]], workers[1 - victims[0]]
        victim.send_signal(signal.SIGKILL)  # mid-shard: no chance to tell luigid
        assert victim.wait(30) == -signal.SIGKILL
        assert wait_all([survivor]) == [0], survivor_log.read_text()[-3000:]
    finally:
        for proc, _ in workers:
            if proc.poll() is None:
                proc.kill()
    (killed,) = [t for t in RUNNING.findall(victim_log.read_text()) if t.startswith("MakeCAMShard")]
    assert killed not in DONE.findall(victim_log.read_text())
    assert killed in DONE.findall(survivor_log.read_text()), "the killed shard was not retried by the survivor"
    status = run_cli([sys.executable, "-m", "pipeline", "status"], cwd, env_extra=env).stdout
    assert "nothing (everything is cached)" in status, status
    assert_same_outputs(reference_work, cwd / "work")


@pytest.mark.slow
def test_slurm_allocation_template_runs_without_slurm(reference_work, tmp_path):
    cwd = tmp_path / "job"
    cwd.mkdir()
    cfg = merged_config(tmp_path / "tiny_job.cfg", [TINY_CFG], {"wsss": {"work_dir": cwd / "work"}})
    for stage in ("PrepareDataset", "PretrainBackbone", "TrainCAM"):  # the GPU-parallel part is what follows
        shutil.copytree(stage_dir(reference_work, stage), cwd / "work" / stage / stage_dir(reference_work, stage).name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(WSSS_REPO=str(REPO), WSSS_VENV=str(Path(sys.executable).parent.parent), WSSS_CONFIG=str(cfg),
               WSSS_GPUS="2", PYTHONPATH=str(REPO))
    proc = subprocess.run(["bash", str(REPO / "configs" / "slurm_allocation.sbatch")], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "workers=2" in proc.stderr
    assert_same_outputs(reference_work, cwd / "work")

"""Scheduling benchmarks (``python -m bench.scheduling``).

1. Scheduling overhead for a 10,000-image dataset (the ``large`` profile: 10,000 train + 1,500 val) at the
   default shard size, on a faked work directory (a manifest with the ids and a provenance file per stage,
   nothing computed):
   - no-op: ``luigi --module pipeline FullWSSS`` with every stage complete, against the bare cost of starting
     Python and importing the pipeline (the ratio ``make bench``'s no-op figure uses);
   - cold graph: only the dataset prepared, the time one worker takes to schedule the whole graph (every
     stage and every shard task) before it can run anything; each worker pays this against luigid.
2. ``MakeCAM`` wall time with ``--workers 1`` against ``--workers 2`` (local scheduler, one torch thread per
   worker) on a ``demo``-size dataset, upstream stages computed once beforehand with a short training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _env(cfg: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), LUIGI_CONFIG_PATH=str(cfg))


def _best_of(cmd: list[str], cwd: Path, env: dict[str, str], repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True)
        best = min(best, time.perf_counter() - start)
    return best


# Runs in a child process: it loads the bench configuration into luigi and fakes the finished stages.
_FAKE_AND_SCHEDULE = """
import json, sys, time
import luigi, luigi.scheduler, luigi.worker
from data.io import write_json
from data.synthetic import PROFILES
from data.artifacts import PROVENANCE  # noqa: E402
from pipeline.framework import ShardedStage  # noqa: E402
from pipeline.tasks import FullWSSS, PrepareDataset, stage_graph

mode = sys.argv[1]
profile = PROFILES["large"]
dataset = PrepareDataset()
train = [f"train_{i:06d}" for i in range(profile.n_train)]
val = [f"val_{i:06d}" for i in range(profile.n_val)]
manifest = {"root": "VOC", "label_space": {"names": ["background", "thing"], "palette": [[0, 0, 0], [128, 0, 0]]},
            "splits": {"train": train, "eval": val, "val": val},
            "image_labels": {i: [1] for i in train + val}, "seg_dir": "SegmentationClass",
            "eval_seg_dir": "SegmentationClass", "quarantine": []}
dataset.stage_dir.mkdir(parents=True, exist_ok=True)
write_json(dataset.stage_dir / "manifest.json", manifest)
write_json(dataset.stage_dir / PROVENANCE, {"stage": "PrepareDataset", "metrics": {}})
shards = 0
for family, task in stage_graph().items():
    if isinstance(task, ShardedStage):
        shards += len(task.shard_tasks())
    if mode == "complete" and family != "PrepareDataset":
        task.stage_dir.mkdir(parents=True, exist_ok=True)
        write_json(task.stage_dir / PROVENANCE, {"stage": family, "metrics": {}})
if mode == "cold":
    luigi.task_register.Register.clear_instance_cache()
    scheduler = luigi.scheduler.Scheduler()
    start = time.perf_counter()
    with luigi.worker.Worker(scheduler=scheduler, worker_processes=1) as worker:
        worker.add(FullWSSS())
    seconds = time.perf_counter() - start
    pending = scheduler.task_list("PENDING", "")
    print(json.dumps({"seconds": seconds, "tasks": len(pending) + len(scheduler.task_list("DONE", "")),
                      "shard_tasks": sum(k.split("_")[0].endswith("Shard") for k in pending)}))
else:
    print(json.dumps({"shard_tasks": shards}))
"""


def bench_scheduling_overhead() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = tmp / "bench.cfg"
        cfg.write_text(f"[preset]\nbase = {REPO / 'configs' / 'demo.cfg'}\n[wsss]\nwork_dir = {tmp / 'work'}\n"
                       "[PrepareDataset]\nkind = synthetic\nprofile = large\n")
        env = _env(cfg)
        cold = json.loads(subprocess.run([sys.executable, "-c", _FAKE_AND_SCHEDULE, "cold"], cwd=REPO, env=env,
                                         check=True, capture_output=True, text=True).stdout)
        done = json.loads(subprocess.run([sys.executable, "-c", _FAKE_AND_SCHEDULE, "complete"], cwd=REPO, env=env,
                                         check=True, capture_output=True, text=True).stdout)
        noop_cmd = [sys.executable, "-m", "luigi", "--module", "pipeline", "FullWSSS", "--no-lock", "--local-scheduler"]
        first = subprocess.run(noop_cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if first.returncode != 0 or "running   " in first.stderr:
            raise RuntimeError("the faked work directory is not complete:\n" + first.stderr[-3000:])
        t_noop = _best_of(noop_cmd, REPO, env)
        t_import = _best_of([sys.executable, "-c", "import pipeline, luigi.cmdline"], REPO, env)
    from data.synthetic import PROFILES
    profile = PROFILES["large"]
    return {"images": f"{profile.n_train} train + {profile.n_val} val", "shard_size": 256,
            "shard_tasks_in_graph": done["shard_tasks"], "noop_rerun_s": t_noop, "python_import_s": t_import,
            "ratio_noop_vs_import": t_noop / t_import, "cold_schedule_s": cold["seconds"],
            "cold_tasks_scheduled": cold["tasks"], "cold_ms_per_task": 1000 * cold["seconds"] / cold["tasks"]}


def bench_make_cam_workers(profile: str = "demo", shard_size: int = 100) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = tmp / "bench.cfg"
        # Short training: the figure is MakeCAM's inference throughput, which does not depend on the weights.
        cfg.write_text(f"""
[preset]
base = {REPO / 'configs' / 'demo.cfg'}
[wsss]
work_dir = {tmp / 'work'}
loader_workers = 0
torch_threads = 1
[PrepareDataset]
kind = synthetic
profile = {profile}
[PretrainBackbone]
steps = 20
batch_size = 8
eval_images = 32
[TrainCAM]
num_epochs = 1
[MakeCAM]
shard_size = {shard_size}
""")
        env = _env(cfg)
        base = [sys.executable, "-m", "luigi", "--module", "pipeline", "--no-lock", "--local-scheduler"]
        subprocess.run([*base, "TrainCAM", "--workers", "2"], cwd=REPO, env=env, check=True, capture_output=True)
        seconds = {}
        for workers in (1, 2):
            start = time.perf_counter()
            subprocess.run([*base, "MakeCAM", "--workers", str(workers)], cwd=REPO, env=env, check=True,
                           capture_output=True)
            seconds[workers] = time.perf_counter() - start
            index = json.loads(next((tmp / "work" / "MakeCAM").glob("*/index.json")).read_text())
            subprocess.run([sys.executable, "-m", "pipeline", "clean", "--stage", "MakeCAM"], cwd=REPO, env=env,
                           check=True, capture_output=True)
    return {"profile": profile, "images": len(index["images"]), "shards": len(index["shards"]),
            "workers_1_s": seconds[1], "workers_2_s": seconds[2], "speedup_2_vs_1": seconds[1] / seconds[2]}


def bench_scheduling() -> dict:
    return {**{f"overhead_{k}": v for k, v in bench_scheduling_overhead().items()},
            **{f"make_cam_{k}": v for k, v in bench_make_cam_workers().items()}}


def main() -> None:
    results = bench_scheduling()
    for key, value in results.items():
        print(f"  {key:<36} {value:.4g}" if isinstance(value, float) else f"  {key:<36} {value}")


if __name__ == "__main__":
    main()

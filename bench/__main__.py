"""``make bench``: speed and size figures as ratios against a baseline measured in the same run.

1. CAM inference (MakeCAM's multiscale_cam): images/s, against a single forward pass of the same net.
2. Dense-map storage: our HDF5 (float16, per-plane chunks, gzip-1 + shuffle) against one ``.npy`` per image
   (float32, IRN's habit): bytes on disk and read time.
3. No-op rerun of ``luigi --module pipeline FullWSSS`` over a 1,000-image dataset, against the bare cost
   of starting Python and importing the pipeline.
4. Propagation methods (bench/propagation.py; alone: ``python -m bench.propagation``): per-image seconds and
   peak MiB of rw_irn, gcn, a2gnn, graphcut and dsrg against a straightforward dense implementation of each, on
   a demo-size and a 500x375 image, with label agreement (the dense sides take minutes at 500x375); and the
   GCN's dense Â product, forward + backward per epoch, against plain autograd (4,032 nodes, one thread).
5. Pseudo-label stages on the demo profile (bench/pseudo_labels.py): seed extraction per rule, affinity-net
   inference and the whole per-image propagation, images/s.
6. Scheduling (bench/scheduling.py): no-op and cold-graph scheduling of a 10,000-image dataset at the default
   shard size, and MakeCAM with ``--workers 2`` against ``--workers 1``.
7. Dense CRF (bench/crf.py; alone: ``python -m bench.crf``): pydensecrf against the torch backend on one
   500x375 image, 21 labels, 10 iterations, deeplab_test and psa_seeds parameters: seconds (pydensecrf;
   torch on the CPU with 1 and all threads; CUDA when present), ratios and argmax agreement %.
8. DeepLab training (bench/segmentation.py): images/s of DeepLab-v2/v3+ on ``resnet_mini`` against the CAM
   net's training step on the same backbone; on CUDA, DeepLab-v2 ResNet-101 MSC with AMP + channels-last
   against float32.
9. Dataset fingerprint (bench/fingerprint.py): PrepareDataset's stat fingerprint of a 10,000-image tree, warm,
   against a bare ``os.stat`` loop over the same files (target: within 1 s).
10. GMNet (bench/gm_loss.py; alone: ``python -m bench.gm_loss [--full]``): the graph-matching loss as one Gram
   product against the reference's loop over class pairs at C = 28/58/108 (time, peak MiB, equal values), and
   the part training step with conditioning and GM against plain DeepLab-v3+ (overhead fractions).
11. Large val images (bench/large_images.py): peak memory of EvalSegmentation's prediction of a 4000x3000 image
   without a pixel limit and at the default ``[EvalSegmentation] max_pixels``, against a 500x375 image.
12. DDD's grid CRF layer (bench/ddd.py; alone: ``python -m bench.ddd``): the vectorised chain DP (recompute
   Function) against plain autograd and a per-chain Python loop at VOC size (33x33, C = 21, batch 8), OS8 (65x65),
   the demo grid and C = 58 / 108: seconds forward and forward + backward, graph and peak memory, and a training
   step of deeplabv3_ddd against plain deeplabv3 on the demo backbone.

Results go to ``bench/results/latest.json`` and are printed as a table.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.crf import bench_crf  # noqa: E402
from bench.ddd import bench_ddd  # noqa: E402
from bench.ddd import table as ddd_table  # noqa: E402
from bench.fingerprint import bench_fingerprint  # noqa: E402
from bench.gm_loss import bench_gm, gm_table  # noqa: E402
from bench.large_images import bench_large_images  # noqa: E402
from bench.maps import smooth_cam_stack  # noqa: E402
from bench.measure import timed  # noqa: E402
from bench.propagation import bench_propagation, printed  # noqa: E402
from bench.pseudo_labels import bench_pseudo_labels  # noqa: E402
from bench.scheduling import bench_scheduling  # noqa: E402
from bench.segmentation import bench_segmentation  # noqa: E402
from data.dense import DenseMapReader, DenseMapWriter  # noqa: E402
from data.synthetic import PROFILES, Profile, render_sample, write_dataset  # noqa: E402
from models.cam import CAMNet  # noqa: E402
from models.resnet import create_backbone  # noqa: E402
from stages.cam.infer import multiscale_cam  # noqa: E402


def bench_cam_inference(n_images: int = 24) -> dict:
    torch.manual_seed(0)
    net = CAMNet(create_backbone("resnet_mini", strides=(1, 2, 1, 1)), 10, freeze_bn=False, frozen_stages=0).eval()
    prof = PROFILES["demo"]
    images = [render_sample(0, "train", i, prof).image for i in range(n_images)]
    cpu = torch.device("cpu")
    scales = (1.0, 0.5, 1.5, 2.0)

    def single():
        with torch.no_grad():
            for rgb in images:
                net.cam(torch.from_numpy(rgb.transpose(2, 0, 1).astype(np.float32))[None])

    def full():
        for rgb in images:
            multiscale_cam(net, rgb, [1, 2], scales, True, net.backbone.output_stride, cpu)

    single()  # warm-up
    t_single, t_full = timed(single, 2), timed(full, 2)
    return {"images": n_images, "size": f"{prof.height}x{prof.width}", "scales": list(scales), "flip": True,
            "images_per_s": n_images / t_full, "single_pass_images_per_s": n_images / t_single,
            "ratio_vs_single_pass": t_full / t_single}


def bench_storage(n_images: int = 200, h: int = 375, w: int = 500) -> dict:
    rng = np.random.default_rng(0)
    stacks = [smooth_cam_stack(rng, int(rng.integers(1, 4)), h, w) for _ in range(n_images)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        npy_dir = tmp / "npy"
        npy_dir.mkdir()

        def write_npy():
            for i, s in enumerate(stacks):
                np.save(npy_dir / f"{i}.npy", s)

        def write_h5():
            with DenseMapWriter(tmp / "cams.h5") as writer:
                for i, s in enumerate(stacks):
                    writer.write(str(i), {"high_res": s})

        t_write_npy, t_write_h5 = timed(write_npy), timed(write_h5)
        size_npy = sum(p.stat().st_size for p in npy_dir.iterdir())
        size_h5 = (tmp / "cams.h5").stat().st_size

        def read_npy():
            for i in range(n_images):
                np.load(npy_dir / f"{i}.npy")

        def read_h5():
            with DenseMapReader([tmp / "cams.h5"]) as reader:
                for i in range(n_images):
                    reader.read(str(i))

        read_npy()
        read_h5()  # warm page cache for both
        t_read_npy, t_read_h5 = timed(read_npy, 3), timed(read_h5, 3)
        with DenseMapReader([tmp / "cams.h5"]) as reader:
            err = max(float(np.abs(reader.read(str(i))[0]["high_res"] - stacks[i]).max()) for i in range(10))
    return {"images": n_images, "size": f"{h}x{w}", "npy_mib": size_npy / 2**20, "h5_mib": size_h5 / 2**20,
            "size_ratio_h5_vs_npy": size_h5 / size_npy,
            "read_ms_per_image_npy": 1000 * t_read_npy / n_images, "read_ms_per_image_h5": 1000 * t_read_h5 / n_images,
            "read_ratio_h5_vs_npy": t_read_h5 / t_read_npy,
            "write_ratio_h5_vs_npy": t_write_h5 / t_write_npy, "max_abs_error_float16": err}


def bench_noop_rerun(n_images: int = 1000) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = write_dataset(tmp / "voc", Profile(n_train=n_images, n_val=20, height=48, width=64), seed=0,
                             processes=max(1, os.cpu_count() or 1))
        cfg = tmp / "bench.cfg"
        cfg.write_text(f"""
[preset]
base = {REPO / 'configs' / 'demo.cfg'}
[wsss]
work_dir = {tmp / 'work'}
loader_workers = 0
[PrepareDataset]
kind = voc
root = {root}
label_space = {root / 'labelspace.json'}
[TrainCAM]
num_epochs = 1
batch_size = 32
resize_long = [48, 64]
crop_size = 64
[MakeCAM]
scales = [1.0]
flip = false
""")
        env = dict(os.environ, PYTHONPATH=str(REPO), LUIGI_CONFIG_PATH=str(cfg))
        cmd = [sys.executable, "-m", "luigi", "--module", "pipeline", "FullWSSS", "--no-lock"]
        start = time.perf_counter()
        first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        t_first = time.perf_counter() - start
        if first.returncode != 0:
            raise RuntimeError(first.stderr[-3000:])
        t_noop = timed(lambda: subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, check=True), 3)
        t_import = timed(lambda: subprocess.run([sys.executable, "-c", "import pipeline, luigi.cmdline"],
                                                cwd=REPO, env=env, check=True), 3)
    return {"images": n_images, "first_run_s": t_first, "noop_rerun_s": t_noop, "python_import_s": t_import,
            "ratio_noop_vs_import": t_noop / t_import}


def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
               "cam_inference": bench_cam_inference(), "storage": bench_storage(), "noop_rerun": bench_noop_rerun(),
               "pseudo_labels": bench_pseudo_labels(), "propagation": bench_propagation(),
               "scheduling": bench_scheduling(), "crf": bench_crf(), "segmentation": bench_segmentation(),
               "fingerprint": bench_fingerprint(), "gmnet": bench_gm(), "large_images": bench_large_images(),
               "ddd": bench_ddd()}
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=1))
    for section, values in results.items():
        print(f"\n[{section}]")
        if section == "propagation":
            print(printed(values))
            continue
        if section == "gmnet":
            print(gm_table(values["loss"]))
            values = values["part_step"]
        if section == "ddd":
            print(ddd_table(values))
            print(json.dumps(values.get("host", {})))
            continue
        for key, value in values.items():
            print(f"  {key:<30} {value:.4g}" if isinstance(value, float) else f"  {key:<30} {value}")


if __name__ == "__main__":
    main()

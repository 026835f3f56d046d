"""The shared training loop: every trained stage resumes a killed run to the weights of an uninterrupted one."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from data.artifacts import BACKBONE_WEIGHTS, RESUME_CHECKPOINT
from stages.config import (
    PretrainBackboneConfig,
    TrainAffinityConfig,
    TrainCAMConfig,
    TrainSeedNetConfig,
    TrainSegmentationConfig,
)
from stages.training.engine import TrainingLoop
from stages.training.optim import make_optimizer, poly_lr

CPU = torch.device("cpu")
TIMING = {"seconds", "update_seconds"}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def assert_same_log(a: Path, b: Path) -> None:
    def rows(path: Path) -> list[dict]:
        with open(path) as fh:
            return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(fh)]
    assert rows(a) == rows(b) and rows(a)


def kill_and_resume(train, tmp_path: Path, weights: str, stop_after: int, resumed_from: int) -> None:
    """``train(out_dir, **kw)`` straight; then killed after ``stop_after`` steps and resumed: same weights."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    train(tmp_path / "a")
    resume = tmp_path / "resume"
    assert train(tmp_path / "b", resume_dir=resume, stop_after=stop_after) == {"stopped_at": stop_after}
    assert (resume / RESUME_CHECKPOINT).is_file() and not (tmp_path / "b" / weights).exists()
    metrics = train(tmp_path / "b", resume_dir=resume)
    if "resumed_from" in metrics:
        assert metrics["resumed_from"] == resumed_from
    assert_same_weights(tmp_path / "a" / weights, tmp_path / "b" / weights)
    assert_same_log(tmp_path / "a" / "log.csv", tmp_path / "b" / "log.csv")


# ------------------------------------------------------------------------------------------ the loop itself

class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class KilledError(Exception):
    pass


def toy_run(resume_dir: Path | None, kill_at: int | None = None) -> dict:
    """Dropout (torch RNG), a numpy Generator and the global numpy / python RNGs all feed the loss."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    model = Toy()
    optimizer = make_optimizer([{"params": list(model.parameters())}], lr=0.1)
    rng = np.random.default_rng(0)
    total = 6

    def batches(start: int):
        return (torch.full((2, 4), float(i)) for i in range(2 * start, 2 * total))

    def step_fn(x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        noise = rng.normal() + np.random.rand() + random.random()
        return (model(x) + noise).pow(2).mean(), {}

    def on_step(loop: TrainingLoop, step: int, micro: list) -> str:
        if step == kill_at:
            raise KilledError
        loop.rows.append({"step": step, "loss": sum(v for v, _ in micro)})
        return f"step {step}"

    loop = TrainingLoop(model, optimizer, total, batches, lambda s: poly_lr(optimizer, s, total, 0.9), step_fn,
                        on_step, accumulation=2, checkpoint_every=2, resume_dir=resume_dir,
                        numpy_generators=[rng])
    loop.run()
    return {"state": model.state_dict(), "rows": loop.rows}


def test_loop_resumes_rng_accumulation_and_log_after_an_exception(tmp_path):
    straight = toy_run(None)
    with pytest.raises(KilledError):
        toy_run(tmp_path, kill_at=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [RESUME_CHECKPOINT]  # written atomically: no temporary left
    resumed = toy_run(tmp_path)
    assert resumed["rows"] == straight["rows"] and len(straight["rows"]) == 6
    assert all(torch.equal(straight["state"][k], resumed["state"][k]) for k in straight["state"])


def test_a_finished_checkpoint_is_not_rewritten_and_progress_is_reported(tmp_path):
    seen = []
    model = Toy()
    optimizer = make_optimizer([{"params": list(model.parameters())}], lr=0.1)
    loop = TrainingLoop(model, optimizer, 2, lambda start: iter([torch.ones(1, 4)] * (2 - start)),
                        lambda s: None, lambda x: (model(x).sum(), {}), lambda lp, s, m: f"step {s}",
                        checkpoint_every=1, resume_dir=tmp_path, progress=lambda p, m: seen.append((p, m)))
    result = loop.run()
    assert (result.step, result.resumed_from, result.stopped) == (2, 0, False)
    assert seen == [(50.0, "step 1"), (100.0, "step 2")]
    assert (tmp_path / RESUME_CHECKPOINT).is_file()  # step 1's; the last step is never checkpointed


# ------------------------------------------------------------------------------------------ the five stages

def test_train_segmentation_resumes_exactly(tiny_manifest, tmp_path, one_thread):
    from stages.segmentation.train import train_segmentation

    cfg = TrainSegmentationConfig(iterations=4, batch_size=4, crop_size=48, lr=0.01, checkpoint_every=2,
                                  eval_every=0, scales=(0.75, 1.0), freeze_bn=False, accumulation=2)

    def labels(image_id, shape):
        return tiny_manifest.layout.read_label(image_id, shape=shape)

    kill_and_resume(lambda out, **kw: train_segmentation(cfg, tiny_manifest, labels, out, CPU, **kw),
                    tmp_path, "model.pt", stop_after=3, resumed_from=2)


def test_train_seed_net_resumes_exactly(tiny_manifest, tmp_path, one_thread):
    from test_seed_training import sparse_seeds

    from stages.seed_net.train import train_seed_net

    cfg = TrainSeedNetConfig(method="dsrg", iterations=4, batch_size=4, crop_size=48, lr=1e-3, freeze_bn=False,
                             schedule="poly", warmup_iterations=0, checkpoint_every=2, predict_scales=(1.0,))
    ids, seeds = tiny_manifest.splits["train"], sparse_seeds(tiny_manifest)
    kill_and_resume(lambda out, **kw: train_seed_net(cfg, tiny_manifest, ids, seeds, out, CPU, **kw),
                    tmp_path, "model.pt", stop_after=3, resumed_from=2)


def test_pretrain_backbone_resumes_exactly(tmp_path, one_thread):
    from stages.pretrain.train import pretrain_backbone

    cfg = PretrainBackboneConfig(steps=5, batch_size=4, image_size=32, eval_images=4)
    kill_and_resume(lambda out, **kw: pretrain_backbone(cfg, out, CPU, loader_workers=0, checkpoint_every=2, **kw),
                    tmp_path, BACKBONE_WEIGHTS, stop_after=3, resumed_from=2)


@pytest.mark.parametrize("checkpoint_every, stop_after, resumed_from", [(0, 4, 3), (2, 3, 2)])
def test_train_affinity_resumes_exactly_at_and_within_an_epoch(checkpoint_every, stop_after, resumed_from,
                                                               tiny_manifest, tmp_path, one_thread):
    from test_affinity import gt_seeds

    from stages.affinity.train import train_affinity

    cfg = TrainAffinityConfig(affinity_method="irnet", radius=5, num_epochs=2, batch_size=4, crop_size=48,
                              scale_range=(0.75, 1.25), init_from_cam=False)
    ids, seeds = tiny_manifest.splits["train"][:12], gt_seeds(tiny_manifest)  # 3 steps per epoch

    def train(out, **kw):
        return train_affinity(cfg, tiny_manifest, ids, seeds, None, out, CPU, checkpoint_every=checkpoint_every,
                              **kw)
    kill_and_resume(train, tmp_path, "model.pt", stop_after=stop_after, resumed_from=resumed_from)


def test_train_cam_resumes_exactly(tiny_manifest, tmp_path, one_thread):
    from stages.cam.train import train_cam

    cfg = TrainCAMConfig(cam_method="cam", backbone="resnet_mini", pretrained="", freeze_bn=False, num_epochs=2,
                         batch_size=8, resize_long=(40, 56), crop_size=48)
    per_epoch = len(tiny_manifest.splits["train"]) // cfg.batch_size
    kill_and_resume(lambda out, **kw: train_cam(cfg, tiny_manifest, out, CPU, loader_workers=0, **kw),
                    tmp_path, "model.pt", stop_after=per_epoch + 1, resumed_from=per_epoch)


def test_seam_resumes_exactly_within_an_epoch(tiny_manifest, tmp_path, one_thread):
    from stages.cam.train import train_cam

    cfg = TrainCAMConfig(cam_method="seam", backbone="resnet_mini", pretrained="", num_epochs=1, batch_size=8,
                         resize_long=(40, 56), crop_size=48, color_jitter=0.3)
    kill_and_resume(lambda out, **kw: train_cam(cfg, tiny_manifest, out, CPU, loader_workers=0, checkpoint_every=1,
                                                **kw),
                    tmp_path, "model.pt", stop_after=2, resumed_from=2)

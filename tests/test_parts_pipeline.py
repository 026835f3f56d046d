"""GMNet's part branch as Luigi stages on tiny data: object maps, part training, EvalParts, the FullWSSS hook."""

from __future__ import annotations

import json

import luigi
import numpy as np
from conftest import run_luigi

from data.artifacts import METRICS, PROVENANCE
from data.dense import stage_maps
from pipeline.tasks import EvalParts, FullWSSS, MakeObjectMaps, PrepareDataset, TrainPartSegmentation, stage_graph


def test_part_branch_runs_on_gt_object_maps_and_is_cached(luigi_config):
    luigi_config("TrainPartSegmentation", "cond_source", "gt")
    result = run_luigi(EvalParts())
    assert result.status == luigi.LuigiStatusCode.SUCCESS, result.summary_text
    manifest = json.loads((PrepareDataset().stage_dir / "manifest.json").read_text())
    maps = stage_maps(MakeObjectMaps(source="gt").stage_dir)
    some = manifest["splits"]["val"][0]
    probs = maps.read(some)[0]["probs"]
    assert probs.shape[0] == 11 and np.allclose(probs.sum(0), 1, atol=1e-2)
    assert set(maps.ids()) == set(manifest["splits"]["train"]) | set(manifest["splits"]["val"])
    metrics = json.loads((EvalParts().stage_dir / METRICS).read_text())
    for name in ("miou", "miou_no_bg", "miou_identifiable", "object_mean_part_iou_zero",
                 "object_mean_part_iou_present", "object_miou", "adjacency_error", "adjacency_error_per_image"):
        assert metrics[name] is not None and 0 <= metrics[name] <= 1 + 1e-9, name
    assert metrics["unidentifiable_parts"] == ["disc.upper", "disc.lower", "ring.upper", "ring.lower"]
    assert len(list((EvalParts().stage_dir / "labels").glob("*.png"))) == len(manifest["splits"]["val"])
    train = json.loads((TrainPartSegmentation().stage_dir / PROVENANCE).read_text())["metrics"]
    assert train["iterations"] == 6 and train["final_gm"] > 0
    # a second run computes nothing: every stage is complete under its key
    luigi.task_register.Register.clear_instance_cache()
    assert all(task.complete() for task in (EvalParts(), TrainPartSegmentation(), MakeObjectMaps(source="gt")))


def test_unconditioned_branch_needs_no_object_maps_and_full_wsss_adds_parts_on_request(luigi_config):
    luigi_config("TrainPartSegmentation", "cond_source", "none")
    assert "maps" not in TrainPartSegmentation().upstream()
    assert "EvalParts" not in stage_graph()
    luigi_config("FullWSSS", "parts", "true")
    graph = stage_graph()
    assert "EvalParts" in graph and "TrainPartSegmentation" in graph and "MakeObjectMaps-gt" not in graph
    luigi_config("TrainPartSegmentation", "cond_source", "supervised")
    graph = stage_graph()
    assert graph["MakeObjectMaps-supervised"].upstream()["model"].stage_name == "TrainSegmentation-gt"
    assert isinstance(FullWSSS().requires_stages()[-1], EvalParts)


def test_training_gmnet_with_the_released_loss_gives_the_weights_of_training_without_it(tiny_manifest, tmp_path,
                                                                                         one_thread):
    import dataclasses

    import torch

    from stages.config import TrainPartSegmentationConfig
    from stages.parts.train import gt_object_maps, part_layout, train_parts

    cfg = TrainPartSegmentationConfig(iterations=3, batch_size=2, crop_size=32, scales=(1.0,), freeze_bn=False,
                                      gm_mode="off", checkpoint_every=10)
    layout = part_layout(tiny_manifest, cfg)

    def maps(image_id: str) -> np.ndarray:
        return gt_object_maps(layout.read_objects(image_id), 11)

    weights = {}
    for mode in ("off", "hard", "st"):
        out = tmp_path / mode
        out.mkdir()
        metrics = train_parts(dataclasses.replace(cfg, gm_mode=mode), tiny_manifest, layout, maps, out,
                              torch.device("cpu"))
        assert (metrics["final_gm"] > 0) == (mode != "off")
        weights[mode] = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.equal(weights["off"][k], weights["hard"][k]) for k in weights["off"])
    assert not all(torch.equal(weights["off"][k], weights["st"][k]) for k in weights["off"])

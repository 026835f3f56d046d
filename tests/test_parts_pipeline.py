"""GMNet's part branch as Luigi stages on tiny data: object maps, part training, EvalParts, the FullWSSS hook."""

from __future__ import annotations

import json

import luigi
import numpy as np
import pytest
from conftest import run_luigi

from data.artifacts import METRICS, PROVENANCE
from data.dense import stage_maps
from pipeline.cli import compared_methods
from pipeline.tasks import (
    EvalParts,
    FullWSSS,
    MakeObjectMaps,
    PrepareDataset,
    Report,
    TrainPartSegmentation,
    stage_graph,
)


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


PART_RUNS = ["gt/st", "none/off", "wsss/st", "supervised/off", "gt/st/10"]


def test_report_compares_part_runs_over_sources_and_gm_modes(luigi_config):
    """Report.parts_compare runs one EvalParts per entry beside the main chain, sharing what the entries share,
    and the report's parts section tables every run with every metric filled, a per-part IoU chart and a gallery."""
    luigi_config("Report", "parts_compare", json.dumps(PART_RUNS))
    luigi_config("FullWSSS", "parts", "true")
    result = run_luigi(FullWSSS())
    assert result.status == luigi.LuigiStatusCode.SUCCESS, result.summary_text
    graph = stage_graph()
    # tiny's configured run is gt/st: that entry is the plain stage; gt/st/10 shares its object maps
    assert [n for n in graph if n.startswith("MakeObjectMaps")] == [
        "MakeObjectMaps-gt", "MakeObjectMaps-supervised", "MakeObjectMaps-wsss"]
    assert graph["MakeObjectMaps-wsss"].upstream()["model"].stage_name == "TrainSegmentation"
    assert graph["MakeObjectMaps-supervised"].upstream()["model"].stage_name == "TrainSegmentation-gt"
    trained = {n: t for n, t in graph.items() if t.get_task_family() == "TrainPartSegmentation"}
    assert sorted(trained) == sorted([
        "TrainPartSegmentation", "TrainPartSegmentation@cond_source=none,gm_mode=off",
        "TrainPartSegmentation@cond_source=wsss", "TrainPartSegmentation@cond_source=supervised,gm_mode=off",
        "TrainPartSegmentation@gm_lambda=10.0"])
    assert len({t.key for t in trained.values()}) == 5
    assert trained["TrainPartSegmentation@gm_lambda=10.0"].gm_lambda == 10.0
    assert "maps" not in trained["TrainPartSegmentation@cond_source=none,gm_mode=off"].upstream()

    markdown = (Report().stage_dir / "report.md").read_text()
    section = markdown.split("## Part segmentation (GMNet)")[1].split("\n## ")[0]
    table = section.split("Per-part IoU")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| run")]
    assert [r[:3] for r in rows] == [["gt/st", "gt", "st"], ["none/off", "none", "off"], ["wsss/st", "wsss", "st"],
                                     ["supervised/off", "supervised", "off"], ["gt/st/10", "gt", "st"]]
    assert [r[3] for r in rows] == ["0.1", "-", "0.1", "-", "10"]
    for row in rows:
        assert all(cell not in ("", "-") for cell in row[4:]), row   # every metric and the training time
    per_part = [line for line in section.split("Per-part IoU")[1].splitlines() if line.startswith("| ")]
    assert len(per_part) == 1 + 28 + 1   # header, the 28 parts of the embedded set, the mean
    summary = json.loads((Report().stage_dir / PROVENANCE).read_text())["metrics"]["parts"]
    metrics = {spec: json.loads((graph_eval.stage_dir / METRICS).read_text())
               for spec, graph_eval in ((s, Report().upstream()[f"parts:{s}"]) for s in PART_RUNS)}
    assert sorted(summary) == sorted(PART_RUNS)
    assert all(summary[s]["miou"] == metrics[s]["miou"] and summary[s]["miou"] is not None for s in PART_RUNS)
    html = (Report().stage_dir / "report.html").read_text()
    assert 'id="parts"' in html and 'href="#parts"' in html
    figures = {p.name for p in (Report().stage_dir / "figures").iterdir()}
    assert {"part_iou.png", "parts_gallery.png"} <= figures
    printed = compared_methods(Report().stage_dir / "report.md")   # what `python -m pipeline summary` prints
    start = printed.index("Part runs compared (report.md):")
    assert len(printed) - start == 1 + 2 + len(PART_RUNS)


def test_a_bad_part_run_entry_stops_scheduling_naming_it(luigi_config, tmp_path):
    for entry, message in (("gt", "source/gm_mode"), ("objects/st", "source one of"), ("gt/st/x", "not a number"),
                           ("gt/sometimes", "gm_mode one of")):
        luigi_config("Report", "parts_compare", json.dumps([entry]))
        with pytest.raises(ValueError, match=f"parts_compare entry '{entry}'.*{message}"):
            stage_graph()
    assert not (tmp_path / "work").exists()

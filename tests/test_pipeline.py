"""The CAM chain end to end on tiny data, caching by key, code-edit invalidation, kill and resume."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import luigi
import numpy as np
import pytest
from conftest import REPO, TINY_CFG, copy_repo, luigi_cmd, run_cli, run_luigi

from data.artifacts import INPUTS_RECORD
from pipeline.framework import shard_store
from pipeline.tasks import (
    EvalCAM,
    EvalPseudoLabels,
    EvalSegmentation,
    ExtractSeeds,
    FullWSSS,
    MakeCAM,
    PrepareDataset,
    Propagate,
    RefineCRF,
    Report,
    TrainAffinity,
    TrainCAM,
    TrainSegmentation,
    stage_graph,
)


def read_all_cams(make_cam_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    store = shard_store(make_cam_dir)
    out = {i: store.read(i)[0] for i in sorted(store.ids())}
    store.close()
    return out


def stage_dirs(work: Path, family: str) -> list[str]:
    base = work / family
    return sorted(p.name for p in base.iterdir()) if base.is_dir() else []


def test_full_chain_runs_and_is_cached(luigi_config, tmp_path):
    result = run_luigi(FullWSSS())
    assert result.status == luigi.LuigiStatusCode.SUCCESS, result.summary_text
    work = tmp_path / "work"
    ev = EvalCAM()
    metrics = json.loads((ev.stage_dir / "metrics.json").read_text())
    assert 0.0 < metrics["miou"] <= 1.0
    assert (ev.stage_dir / "curve.png").stat().st_size > 1000
    prov = json.loads((ev.stage_dir / "provenance.json").read_text())
    assert prov["inputs"]["cams"]["key"] == MakeCAM().key
    assert "stages.cam.evaluate" in prov["code"] and prov["versions"]["torch"]
    assert json.loads((TrainCAM().stage_dir / "provenance.json").read_text())["seed"] == 0
    # Every image of train+eval has a CAM with only its GT classes, max-normalised.
    cams = read_all_cams(MakeCAM().stage_dir)
    manifest = json.loads((PrepareDataset().stage_dir / "manifest.json").read_text())
    assert set(cams) == set(manifest["splits"]["train"]) | set(manifest["splits"]["eval"])
    some = next(iter(cams))
    assert cams[some]["high_res"].shape[0] == len(manifest["image_labels"][some])
    assert np.all(cams[some]["high_res"].max(axis=(1, 2)) <= 1.0 + 1e-3)
    assert not list(work.glob("*/*.parts")) and not list(work.glob("*/*.tmp-*"))
    check_pseudo_label_chain(manifest)
    check_segmentation_and_report(manifest, work)

    # Second run: nothing to do.
    luigi.task_register.Register.clear_instance_cache()
    again = run_luigi(FullWSSS())
    assert again.status == luigi.LuigiStatusCode.SUCCESS
    scheduled = {t.task_family for t, status, _ in again.worker._add_task_history if status != "DONE"}
    assert not scheduled, f"a cached run scheduled {scheduled}"


def check_pseudo_label_chain(manifest: dict) -> None:
    """Seeds and pseudo labels exist for every image as palette PNGs; the report holds the whole chain."""
    from data.io import read_label_png
    from data.labelspace import LabelSpace
    space = LabelSpace.from_dict(manifest["label_space"])
    images = set(manifest["splits"]["train"]) | set(manifest["splits"]["eval"])
    for stage in (ExtractSeeds(), Propagate()):
        pngs = {p.stem for p in (stage.stage_dir / "labels").glob("*.png")}
        assert pngs == images, stage.get_task_family()
    some = sorted(images)[0]
    labels = read_label_png(Propagate().stage_dir / "labels" / f"{some}.png", space)
    assert set(np.unique(labels)) <= {0, *manifest["image_labels"][some]}, "pseudo labels use only GT classes"
    probs = shard_store(Propagate().stage_dir).read(some, ["probs"])[0]["probs"]
    assert probs.shape == (1 + len(manifest["image_labels"][some]), *labels.shape)
    metrics = json.loads((EvalPseudoLabels().stage_dir / "metrics.json").read_text())
    chain = metrics["chain"]
    assert 0 < chain["pseudo_label_miou"] <= 1 and 0 < chain["cam_miou"] <= 1 and 0 < chain["seed_miou"] <= 1
    assert set(metrics["seeds"]["classes"]) == set(space.names)
    assert "pseudo-label IoU" in (EvalPseudoLabels().stage_dir / "report.md").read_text()
    prov = json.loads((TrainAffinity().stage_dir / "provenance.json").read_text())
    assert prov["inputs"]["seeds"]["key"] == ExtractSeeds().key and prov["seed"] == 0


def check_segmentation_and_report(manifest: dict, work: Path) -> None:
    """CRF-refined pseudo labels, DeepLab on them and on GT (the ceiling), val predictions, the report."""
    images = set(manifest["splits"]["train"]) | set(manifest["splits"]["eval"])
    assert {p.stem for p in (RefineCRF().stage_dir / "labels").glob("*.png")} == images
    chain = json.loads((EvalPseudoLabels().stage_dir / "metrics.json").read_text())["chain"]
    assert 0 < chain["refined_miou"] <= 1
    pseudo, ceiling = TrainSegmentation(), TrainSegmentation(labels="gt")
    assert pseudo.key != ceiling.key
    for trained in (pseudo, ceiling):
        assert (trained.stage_dir / "model.pt").is_file()
        header = (trained.stage_dir / "log.csv").read_text().splitlines()[0]
        assert header == "epoch,iteration,loss,lr,val_miou,train_miou,seconds"
        final = json.loads((trained.stage_dir / "provenance.json").read_text())["metrics"]
        assert 0 <= final["train_miou"] <= 1 and 0 <= final["val_miou"] <= 1
    assert "pseudo_labels" in json.loads((pseudo.stage_dir / "provenance.json").read_text())["inputs"]
    assert "pseudo_labels" not in json.loads((ceiling.stage_dir / "provenance.json").read_text())["inputs"]
    for evaluated in (EvalSegmentation(), EvalSegmentation(labels="gt")):
        metrics = json.loads((evaluated.stage_dir / "metrics.json").read_text())
        assert 0 <= metrics["miou"] <= 1 and metrics["n_images"] == len(manifest["splits"]["val"])
        assert {p.stem for p in (evaluated.stage_dir / "labels").glob("*.png")} == set(manifest["splits"]["val"])
    assert not list(work.glob("*/*.resume")), "resume checkpoints are removed once a model is published"
    html = (Report().stage_dir / "report.html").read_text()
    assert "<html" in html.lower() and (Report().stage_dir / "report.md").is_file()
    check_cooccurrence(manifest)


def check_cooccurrence(manifest: dict) -> None:
    """The report's co-occurrence figures are those of the labels DeepLab trained on (after the CRF) and of its val
    predictions; the synthetic data's scenes are the context."""
    from pipeline.framework import manifest_of
    from stages.report.cooccurrence import SCENE_CONTEXT, measure_cooccurrence

    report = Report()
    summary = json.loads((report.stage_dir / "provenance.json").read_text())["metrics"]
    measured = measure_cooccurrence(manifest_of(report), RefineCRF().stage_dir, report.cooccurrence_flag,
                                    EvalSegmentation().stage_dir)
    assert measured.context_kind == SCENE_CONTEXT and measured.val_images == len(manifest["splits"]["val"])
    assert summary["cooccurrence_on_background"] == {row.name: row.on_background for row in measured.classes}
    assert summary["cooccurrence_flagged"] == measured.flagged
    assert set(summary["cooccurrence_on_background"]) == set(manifest["label_space"]["names"][1:])
    markdown = (report.stage_dir / "report.md").read_text()
    assert "## Co-occurrence" in markdown and "top background scene (share)" in markdown


def test_psa_seam_family_runs_end_to_end(luigi_config):
    """SEAM CAMs -> PSA la/ha seeds -> AffinityNet -> PSA random walk, on the CPU variants."""
    for section, option, value in [("TrainCAM", "cam_method", "seam"), ("TrainCAM", "backbone", "resnet38_mini"),
                                   ("TrainCAM", "pretrained", ""),
                                   ("ExtractSeeds", "seed_method", "psa"), ("ExtractSeeds", "alpha_high", 24),
                                   ("TrainAffinity", "affinity_method", "affinitynet"),
                                   ("TrainAffinity", "backbone", "resnet38_mini"), ("TrainAffinity", "radius", 5),
                                   ("TrainAffinity", "crop_size", 96), ("TrainAffinity", "scale_range", "[1, 1]"),
                                   ("Propagate", "propagation", "rw_psa"), ("Propagate", "beta", 8),
                                   ("Propagate", "steps", "auto:64"), ("Propagate", "alpha", 6)]:
        luigi_config(section, option, value)
    result = run_luigi(FullWSSS())
    assert result.status == luigi.LuigiStatusCode.SUCCESS, result.summary_text
    manifest = json.loads((PrepareDataset().stage_dir / "manifest.json").read_text())
    check_pseudo_label_chain(manifest)
    # SEAM's t = 64 on VOC's grid, fitted to the tiny 80x64 images: 64 x 320 / 11750 = 1.7 -> 2 steps
    fitted = json.loads((Propagate().stage_dir / "provenance.json").read_text())["fitted"]
    assert fitted["knobs"]["steps"]["value"] == 2 and "auto:64" == fitted["knobs"]["steps"]["set"]
    assert "stages.auto" in Propagate().code_modules
    seeds = shard_store(ExtractSeeds().stage_dir)
    some = manifest["splits"]["train"][0]
    la_ha = seeds.read(some, ["la", "ha"])[0]
    assert la_ha["la"].shape[0] == 1 + len(manifest["image_labels"][some]), "PSA keeps the la/ha CRF maps"


def test_compared_methods_run_beside_the_main_chain(luigi_config, tmp_path):
    """Report.compare runs each graph method (and box seeds) from the same CAMs and tables them in the report."""
    methods = ["graphcut@main", "dsrg@main", "gcn@main", "a2gnn/box@main", "rw_irn/box@main"]
    luigi_config("Report", "compare", json.dumps(methods))
    luigi_config("Report", "compare_segmentation", "false")  # test_recipe_comparison... covers DeepLab per method
    # A few epochs per image: the test checks the wiring, tests/test_gcn.py and test_a2gnn.py the methods.
    for option, value in [("gcn_epochs", 5), ("a2gnn_seed_epochs", 3), ("a2gnn_gcrf_epochs", 3)]:
        luigi_config("Propagate", option, value)
    # every trained net's crop fitted to the data: the nets are then loaded (Propagate, EvalSegmentation, Report)
    # with the values their training resolved
    for section in ("TrainAffinity", "TrainSeedNet", "TrainSegmentation"):
        luigi_config(section, "crop_size", "auto:0.78")
    luigi_config("Propagate", "steps", "auto")      # read by rw_irn, not by graphcut, dsrg, gcn or a2gnn
    result = run_luigi(FullWSSS(), workers=1)
    assert result.status == luigi.LuigiStatusCode.SUCCESS, result.summary_text
    graph = stage_graph()
    manifest = json.loads((PrepareDataset().stage_dir / "manifest.json").read_text())
    images = set(manifest["splits"]["train"]) | set(manifest["splits"]["eval"])
    # One seed stage serves both box-supervised methods; the main chain's stages keep their plain names.
    assert [n for n in graph if n.startswith("ExtractSeeds")] == ["ExtractSeeds", "ExtractSeeds@supervision=box"]
    assert {"TrainSeedNet@method=dsrg", "TrainSeedNet"} <= set(graph)
    assert graph["TrainSeedNet"].method == "graphcut"
    propagations = {n: t for n, t in graph.items() if t.get_task_family() == "Propagate"}
    assert sorted(t.propagation for t in propagations.values()) == sorted(
        ["rw_irn", "graphcut", "dsrg", "gcn", "a2gnn", "rw_irn"])
    assert len({t.key for t in propagations.values()}) == len(propagations) == 6
    for task in propagations.values():
        assert {p.stem for p in (task.stage_dir / "labels").glob("*.png")} == images, task.stage_name
    box_seeds = graph["ExtractSeeds@supervision=box"]
    assert box_seeds.supervision == "box" and box_seeds.key != ExtractSeeds().key
    assert graph["Propagate@supervision=box,propagation=a2gnn,affinity_method=a2gnn,window_radius=4"].upstream()[
        "affinity"].window_radius == 4
    summary = json.loads((Report().stage_dir / "provenance.json").read_text())["metrics"]
    markdown = (Report().stage_dir / "report.md").read_text()
    table = markdown.split("## Propagation methods compared")[1].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [row.split(" | ")[0].lstrip("| ") for row in rows] == ["rw_irn/image (main chain)", *methods]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(cell not in ("", "-") for cell in cells[2:8]), row  # every mIoU, the CRF and the gain
        assert cells[1] == ("main chain's seeds" if "@main" in cells[0] else "configs/tiny.cfg")
    html = (Report().stage_dir / "report.html").read_text()
    assert 'id="methods"' in html and summary  # the section and its nav entry


def test_recipe_comparison_runs_the_recipe_from_the_main_chains_cams_down_to_deeplab(luigi_config, tmp_path):
    """A recipe entry runs every stage after the CAMs as its preset does (here WSGCN's GCN and its own final CRF)
    and retrains DeepLab on its labels; what the recipe sets for the CAM stages is not used."""
    recipe = tmp_path / "tiny_wsgcn.cfg"
    recipe.write_text(f"[preset]\nbase = {TINY_CFG}\n\n[TrainCAM]\nnum_epochs = 7\n\n"
                      "[Propagate]\npropagation = gcn\ngcn_epochs = 5\n\n[RefineCRF]\npreset = method\n")
    luigi_config("Report", "compare", json.dumps([str(recipe)]))
    result = run_luigi(FullWSSS(), workers=1)
    assert result.status == luigi.LuigiStatusCode.SUCCESS, result.summary_text
    graph = stage_graph()
    assert [n for n in graph if n.startswith(("TrainCAM", "MakeCAM", "ExtractSeeds", "TrainAffinity"))] == [
        "TrainCAM", "MakeCAM", "ExtractSeeds", "TrainAffinity"]  # shared with the main chain
    refined = graph["RefineCRF@gcn_epochs=5,propagation=gcn,preset=method"]
    assert refined.crf_preset == "wsgcn_final" and RefineCRF().crf_preset == "a2gnn_final"
    assert json.loads((refined.stage_dir / "provenance.json").read_text())["metrics"]["crf_preset"] == "wsgcn_final"
    deeplab = graph["TrainSegmentation@gcn_epochs=5,propagation=gcn,preset=method"]
    assert deeplab.upstream()["pseudo_labels"].stage_dir == refined.stage_dir
    markdown = (Report().stage_dir / "report.md").read_text()
    table = markdown.split("## Propagation methods compared")[1].split("\n## ")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| method")]
    assert [(r[0], r[1], r[6]) for r in rows] == [("rw_irn/image (main chain)", "configs/tiny.cfg", "a2gnn_final"),
                                                  (str(recipe), str(recipe), "wsgcn_final")]
    assert all(r[8] not in ("", "-") and r[9].endswith("%") for r in rows)  # DeepLab on its labels / ceiling
    from pipeline.cli import compared_methods
    printed = compared_methods(Report().stage_dir / "report.md")   # what `python -m pipeline summary` prints
    assert printed[0].startswith("Methods compared") and len(printed) == 1 + 2 + len(rows)


@pytest.mark.parametrize(("section", "option", "value", "message"), [
    ("ExtractSeeds", "seed_method", "magic", "ExtractSeeds.seed_method"),
    ("ExtractSeeds", "alpha_low", 0, "alpha"),
    ("TrainAffinity", "affinity_method", "magic", "TrainAffinity.affinity_method"),
    ("Propagate", "propagation", "magic", "Propagate.propagation"),
    ("Propagate", "alpha", -1, "Propagate.alpha"),
    ("TrainCAM", "cam_method", "magic", "TrainCAM.cam_method"),
    ("RefineCRF", "preset", "method", "rw_irn has no final CRF"),
])
def test_bad_method_or_alpha_fails_before_running_naming_the_key(luigi_config, tmp_path, section, option, value,
                                                                  message):
    luigi_config(section, option, value)
    with pytest.raises((KeyError, ValueError), match=message):
        stage_graph()  # instantiating the stages validates their configs, as scheduling does
    assert not (tmp_path / "work").exists(), "nothing may run with a bad config"


def test_config_change_reruns_only_affected_stages(luigi_config, tmp_path):
    assert run_luigi(FullWSSS()).status == luigi.LuigiStatusCode.SUCCESS
    work = tmp_path / "work"
    before = {s: stage_dirs(work, s) for s in ("TrainCAM", "MakeCAM", "EvalCAM")}
    luigi_config("EvalCAM", "bg_threshold", 0.2)
    assert run_luigi(FullWSSS()).status == luigi.LuigiStatusCode.SUCCESS
    after = {s: stage_dirs(work, s) for s in ("TrainCAM", "MakeCAM", "EvalCAM")}
    assert after["TrainCAM"] == before["TrainCAM"] and after["MakeCAM"] == before["MakeCAM"]
    assert len(after["EvalCAM"]) == 2
    luigi_config("EvalCAM", "bg_threshold", 0.15)  # reverting finds the old artifact: no new key
    assert EvalCAM().key in before["EvalCAM"]


def test_bad_config_value_names_the_key(luigi_config):
    luigi_config("EvalCAM", "pred_ignore", "sometimes")
    result = run_luigi(FullWSSS())
    assert result.status != luigi.LuigiStatusCode.SUCCESS
    with pytest.raises(ValueError, match="pred_ignore"):
        from stages.config import validate
        validate(EvalCAM().config)


@pytest.mark.slow
def test_rerun_nothing_comment_edit_nothing_code_edit_reruns_downstream(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    cwd = tmp_path / "run"
    cwd.mkdir()
    (cwd / "luigi.cfg").write_text((repo / "luigi.cfg").read_text())
    work = cwd / "work"
    run_cli(luigi_cmd(), cwd, repo=repo)
    first = {s: stage_dirs(work, s) for s in ("PrepareDataset", "TrainCAM", "MakeCAM", "EvalCAM")}
    assert all(len(v) == 1 for v in first.values())

    # A second run does nothing.
    proc = run_cli(luigi_cmd(), cwd, repo=repo)
    assert "running   " not in proc.stderr, "a cached run executed a task"  # luigi logs each task it runs

    # A comment and a docstring edit in the code MakeCAM runs: same keys.
    src = repo / "stages" / "cam" / "infer.py"
    text = src.read_text()
    src.write_text(text.replace('"""Multi-scale CAM inference', '"""Multi-scale CAM inference (edited doc)', 1)
                   + "\n# a comment that changes nothing\n")
    run_cli(luigi_cmd(), cwd, repo=repo)
    assert {s: stage_dirs(work, s) for s in first} == first

    # A real edit: MakeCAM and EvalCAM rerun, TrainCAM and PrepareDataset do not.
    src.write_text(text.replace("+ 1e-5)", "+ 2e-5)"))
    run_cli(luigi_cmd(), cwd, repo=repo)
    second = {s: stage_dirs(work, s) for s in first}
    assert second["PrepareDataset"] == first["PrepareDataset"]
    assert second["TrainCAM"] == first["TrainCAM"]
    assert len(second["MakeCAM"]) == 2 and len(second["EvalCAM"]) == 2

    # Reverting the edit finds the old artifacts: nothing new.
    src.write_text(text)
    run_cli(luigi_cmd(), cwd, repo=repo)
    assert {s: stage_dirs(work, s) for s in first} == second


KILLER = """
import os, signal
import stages.cam.infer as mc
original = mc.make_cams
def dying(model, manifest, ids, writer, *a, **k):
    if ids[0] == manifest.splits["train"][{kill_at}]:
        writer.write(ids[0], {{"cam": [[[0.0]]]}})
        os.kill(os.getpid(), signal.SIGKILL)  # a kill -9 in the middle of a shard
    return original(model, manifest, ids, writer, *a, **k)
mc.make_cams = dying
import luigi.cmdline
luigi.cmdline.luigi_run(["--module", "pipeline", "FullWSSS", "--no-lock"])
"""


@pytest.mark.slow
def test_killed_make_cam_resumes_with_identical_outputs(tmp_path):
    clean_cwd, killed_cwd = tmp_path / "clean", tmp_path / "killed"
    for cwd in (clean_cwd, killed_cwd):
        cwd.mkdir()
        (cwd / "luigi.cfg").write_text((REPO / "luigi.cfg").read_text())
    run_cli(luigi_cmd(), clean_cwd)

    # shard_size 8 on 24 train images: kill while writing the second of three shards.
    proc = run_cli([sys.executable, "-c", KILLER.format(kill_at=8)], killed_cwd, check=False)
    assert proc.returncode != 0
    work = killed_cwd / "work"
    parts = list((work / "MakeCAM").glob("*.parts"))
    assert len(parts) == 1, "the finished shard is kept for the rerun"
    # inputs.json: what the unfinished work reads, so that gc under another configuration keeps it
    assert sorted(p.name for p in parts[0].iterdir() if ".tmp-" not in p.name) == [INPUTS_RECORD,
                                                                                   "shard-00000-of-00003"]
    assert not [p for p in (work / "MakeCAM").iterdir() if not p.name.endswith(".parts")], \
        "no MakeCAM directory may look complete after the kill"

    run_cli(luigi_cmd(), killed_cwd)
    (clean_dir,) = [p for p in (clean_cwd / "work" / "MakeCAM").iterdir()]
    (resumed_dir,) = [p for p in (work / "MakeCAM").iterdir()]
    assert clean_dir.name == resumed_dir.name
    clean, resumed = read_all_cams(clean_dir), read_all_cams(resumed_dir)
    assert clean.keys() == resumed.keys()
    for image_id in clean:
        for name in ("cam", "high_res"):
            np.testing.assert_array_equal(clean[image_id][name], resumed[image_id][name])
    ev_clean = json.loads(next((clean_cwd / "work" / "EvalCAM").glob("*/metrics.json")).read_text())
    ev_resumed = json.loads(next((work / "EvalCAM").glob("*/metrics.json")).read_text())
    assert ev_clean["miou"] == ev_resumed["miou"]


@pytest.mark.slow
def test_failed_pipeline_exits_nonzero_and_cli_verbs(tmp_path):
    cwd = tmp_path / "run"   # empty: the project's luigi.cfg ([retcode]) applies from any directory
    cwd.mkdir()
    # A config error is found while scheduling: nothing runs, [retcode] scheduling_error.
    proc = run_cli(luigi_cmd("--EvalCAM-sweep", "[0.5, 0.1, 0.01]"), cwd, check=False)
    assert proc.returncode == 35 and "EvalCAM.sweep" in proc.stderr, proc.stderr[-2000:]
    assert not (cwd / "work").exists()
    # A stage failing at run time (no pair of radius 5 fits a 16 px crop): [retcode] task_failed.
    proc = run_cli(luigi_cmd("--TrainAffinity-crop-size", "16"), cwd, check=False)
    assert proc.returncode == 30 and "TrainAffinity.crop_size" in proc.stderr, proc.stderr[-2000:]

    status = run_cli([sys.executable, "-m", "pipeline", "status"], cwd).stdout
    assert "TrainAffinity" in status and "to run" in status and "cached" in status
    run_cli(luigi_cmd(), cwd)
    assert "nothing (everything is cached)" in run_cli([sys.executable, "-m", "pipeline", "status"], cwd).stdout
    summary = run_cli([sys.executable, "-m", "pipeline", "summary"], cwd).stdout
    assert "CAM mIoU" in summary
    status = run_cli([sys.executable, "-m", "pipeline", "status"], cwd).stdout
    status_rows = [line.split() for line in status.splitlines()]
    keys = {row[0]: row[1] for row in status_rows if row and row[0].startswith("EvalSegmentation")}
    seg, ceiling = (json.loads((cwd / "work" / "EvalSegmentation" / keys[family] / "metrics.json").read_text())
                    for family in ("EvalSegmentation", "EvalSegmentation-gt"))
    assert f"DeepLab / ceiling: {100 * seg['miou'] / ceiling['miou']:.1f}% of the fully supervised" in summary
    assert "Co-occurrence flag (report): " in summary
    # a sharded stage's seconds are its shards' (its own run is only the join)
    make_cam = next(line for line in summary.splitlines() if line.startswith("MakeCAM "))
    record = json.loads(next((cwd / "work" / "MakeCAM").glob("*/provenance.json")).read_text())
    assert float(make_cam.split()[2]) == pytest.approx(record["seconds"] + record["metrics"]["shard_seconds"],
                                                       abs=0.06)

    dry = run_cli([sys.executable, "-m", "pipeline", "clean", "--stage", "MakeCAM", "--downstream", "--dry-run"],
                  cwd).stdout
    assert "MakeCAM" in dry and "EvalCAM" in dry and "TrainCAM" not in dry
    assert len(list((cwd / "work" / "MakeCAM").iterdir())) == 1
    run_cli([sys.executable, "-m", "pipeline", "clean", "--stage", "MakeCAM", "--downstream"], cwd)
    assert not list((cwd / "work" / "MakeCAM").iterdir())
    status = run_cli([sys.executable, "-m", "pipeline", "status"], cwd).stdout
    assert "would run: MakeCAM, EvalCAM" in status

    # gc: debris and keys the current config no longer references go; live artifacts stay.
    debris = cwd / "work" / "TrainCAM" / "abc.tmp-0123456789"
    debris.mkdir()
    stale = cwd / "work" / "TrainCAM" / "0000000000000000"
    stale.mkdir()
    run_cli([sys.executable, "-m", "pipeline", "gc", "--min-age", "0"], cwd)
    assert not debris.exists() and not stale.exists()
    assert len(list((cwd / "work" / "TrainCAM").iterdir())) == 1

    printed = run_cli([sys.executable, "-m", "pipeline", "config"], cwd).stdout
    assert "[TrainCAM]" in printed and "[PrepareDataset]" in printed  # sections luigi actually reads
    help_text = run_cli([sys.executable, "-m", "pipeline", "--help"], cwd).stdout
    for verb in ("status", "clean", "gc", "make-dataset", "summary"):
        assert verb in help_text


def test_a_method_s_own_knobs_enter_only_its_propagate_key(luigi_config):
    """gcn_* / a2gnn_* knobs are in the key (and provenance) of Propagate only when that method runs."""
    base = {method: Propagate(propagation=method).key for method in ("rw_irn", "gcn", "a2gnn")}
    luigi_config("Propagate", "a2gnn_rw_logt", 5)
    after = {method: Propagate(propagation=method).key for method in ("rw_irn", "gcn", "a2gnn")}
    assert after["rw_irn"] == base["rw_irn"] and after["gcn"] == base["gcn"]
    assert after["a2gnn"] != base["a2gnn"]
    luigi_config("Propagate", "gcn_epochs", 7)
    assert Propagate(propagation="gcn").key != base["gcn"] and Propagate(propagation="rw_irn").key == base["rw_irn"]
    params = Propagate(propagation="a2gnn").params_dict
    assert params["a2gnn_rw_logt"] == 5 and not any(k.startswith("gcn_") for k in params)
    assert "beta" in params and "gcn_epochs" in Propagate(propagation="gcn").params_dict


def test_compared_segmenters_train_on_pseudo_labels_and_gt_beside_the_main_one(luigi_config):
    """Report.compare_segmenters trains DeepLab-v3 + DDD on the same pseudo labels and on GT and tables it, with and
    without the dense CRF, under the main segmenter."""
    luigi_config("Report", "compare_segmenters", json.dumps(["deeplabv3_ddd:output_stride=8,ddd_iterations=3"]))
    result = run_luigi(FullWSSS(), workers=1)
    assert result.status == luigi.LuigiStatusCode.SUCCESS, result.summary_text
    graph = stage_graph()
    trainers = [t for t in graph.values() if t.get_task_family() == "TrainSegmentation"]
    assert sorted((t.model, t.labels) for t in trainers) == [("deeplabv2", "gt"), ("deeplabv2", "pseudo"),
                                                             ("deeplabv3_ddd", "gt"), ("deeplabv3_ddd", "pseudo")]
    assert TrainSegmentation().model == "deeplabv2"
    markdown = (Report().stage_dir / "report.md").read_text()
    table = markdown.split("## Segmenters compared")[1].split("\n## ")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| segmenter")]
    spec = "deeplabv3_ddd:output_stride=8,ddd_iterations=3"
    assert [row[:2] for row in rows] == [["deeplabv2 (main chain)", "pseudo labels"], ["deeplabv2 (main chain)", "GT"],
                                         [spec, "pseudo labels"], [spec, "GT"]]
    assert all(t.output_stride == 8 and t.ddd_iterations == 3 for t in trainers if t.model == "deeplabv3_ddd")
    assert all(cell not in ("", "-") for row in rows for cell in row[2:5]), rows

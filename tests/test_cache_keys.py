"""Edit one module, and exactly the stages that run it and what follows them get new keys.

For every module of ``stages/``, ``models/`` and ``data/`` the test appends one real statement to a private copy
of the library, recomputes the key of every stage the configuration runs (the default chain plus every compared
method, ``Report.compare``), and checks that the changed keys are the stages listed for that module in
:data:`RUNS` plus everything downstream of them. :data:`RUNS` is the reviewable statement of which stage runs
which code: a method's module appears only under the stages that run that method.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import luigi
import pytest
from conftest import REPO

from pipeline import hashing
from pipeline.tasks import stage_graph

COMPARE = tuple(f"{spec}@main" for spec in ("rw_psa", "gcn", "a2gnn", "a2gnn/box", "graphcut", "dsrg", "rw_irn/point",
                                              "rw_irn/scribble"))
ALL = ("PrepareDataset", "PretrainBackbone", "TrainCAM", "MakeCAM", "EvalCAM", "ExtractSeeds", "TrainAffinity",
       "TrainSeedNet", "Propagate", "RefineCRF", "EvalPseudoLabels", "TrainSegmentation", "EvalSegmentation", "Report")
NETS = ("PretrainBackbone", "TrainCAM", "MakeCAM", "TrainAffinity", "TrainSeedNet", "Propagate", "TrainSegmentation",
        "EvalSegmentation", "Report")                       # the stages that build a network
TRAINERS = ("PretrainBackbone", "TrainCAM", "TrainAffinity", "TrainSeedNet", "Propagate", "TrainSegmentation")
AFFINITY_PROPAGATIONS = "Propagate[propagation=a2gnn|gcn|rw_irn|rw_psa]"   # read an affinity net
SEED_NET_PROPAGATIONS = "Propagate[propagation=dsrg|graphcut]"            # read a TrainSeedNet net
CRF_USERS = ("ExtractSeeds", "TrainSeedNet", "Propagate[propagation=a2gnn|dsrg|gcn|graphcut]", "RefineCRF",
             "EvalPseudoLabels", "EvalSegmentation", "Report")
SEGMENTER_USERS = ("TrainSeedNet", SEED_NET_PROPAGATIONS, "TrainSegmentation", "EvalSegmentation", "Report")
REGISTRY_USERS = (*NETS, "EvalCAM", "ExtractSeeds", "RefineCRF", "EvalPseudoLabels")   # models.registry
SEED_NET = ("TrainSeedNet", SEED_NET_PROPAGATIONS)

# module -> the stages that run it: "Family" (every instance) or "Family[knob=a|b]" (instances whose knob is a or b).
RUNS: dict[str, tuple[str, ...]] = {
    "data": ALL,
    "data.artifacts": ALL,   # names of files in stage directories, and the image id rules (read by data.voc)
    "data.dense": ("MakeCAM", "EvalCAM", "ExtractSeeds", "Propagate", "RefineCRF", "Report"),
    "data.io": ALL,
    "data.labelspace": ALL,
    "data.manifest": tuple(s for s in ALL if s != "PretrainBackbone"),
    "data.parts": ("PrepareDataset", "PretrainBackbone"),                 # data.synthetic writes parts.json
    "data.synthetic": ("PrepareDataset", "PretrainBackbone"),
    "data.transforms": ("PretrainBackbone", "TrainCAM", "MakeCAM", "TrainAffinity", "TrainSeedNet", "Propagate",
                        "TrainSegmentation", "EvalSegmentation", "Report"),
    "data.voc": tuple(s for s in ALL if s != "PretrainBackbone"),
    "models": REGISTRY_USERS,                    # models.registry's package
    "models.a2gnn": ("TrainAffinity[affinity_method=a2gnn]", "Propagate[propagation=a2gnn]"),
    "models.affinity": ("TrainAffinity", AFFINITY_PROPAGATIONS),
    "models.cam": ("TrainCAM", "MakeCAM"),
    "models.classifier": ("PretrainBackbone",),
    "models.ddd": (),                           # model = deeplabv3_ddd only
    "models.deeplab": SEGMENTER_USERS,
    "models.deeplab_ddd": (),
    "models.gmnet": (),                         # the part branch only
    "models.norm": NETS,
    "models.pairs": ("TrainAffinity", AFFINITY_PROPAGATIONS),
    "models.registry": REGISTRY_USERS,
    "models.resnet": NETS,
    "models.resnet38": NETS,
    "models.seam": (),                      # cam_method = seam only
    "models.segmenters": SEGMENTER_USERS,
    "stages": ALL,
    "stages.auto": (),                      # only stages with a knob set to auto (tiny.cfg sets none;
    #                                         tests/test_auto_knobs.py: the module is then in their keys)
    "stages.affinity": ("TrainAffinity", AFFINITY_PROPAGATIONS),
    "stages.affinity.a2gnn": ("TrainAffinity[affinity_method=a2gnn]", "Propagate[propagation=a2gnn]"),
    "stages.affinity.train": ("TrainAffinity", AFFINITY_PROPAGATIONS),
    "stages.cam": ("TrainCAM", "MakeCAM", "EvalCAM"),
    "stages.cam.evaluate": ("EvalCAM",),
    "stages.cam.infer": ("MakeCAM",),
    "stages.cam.irn": ("TrainCAM", "MakeCAM"),
    "stages.cam.methods": ("TrainCAM", "MakeCAM"),
    "stages.cam.psa": (),                   # cam_method = psa only
    "stages.cam.seam": (),                  # cam_method = seam only
    "stages.cam.train": ("TrainCAM",),
    "stages.config": (),                    # knobs enter keys by value (pipeline.hashing.VALUE_MODULES)
    "stages.dataset": ("PrepareDataset",),
    "stages.dataset.prepare": ("PrepareDataset",),
    "stages.metrics": ("EvalCAM", "TrainSeedNet", "Propagate", "EvalPseudoLabels", "TrainSegmentation",
                       "EvalSegmentation", "Report"),
    "stages.parts": (),                     # the part branch: [FullWSSS] parts = true only
    "stages.parts.evaluate": (),
    "stages.parts.graph_matching": (),
    "stages.parts.object_maps": (),
    "stages.parts.train": (),
    "stages.pretrain": ("PretrainBackbone",),
    "stages.pretrain.train": ("PretrainBackbone",),
    "stages.propagation": ("Propagate", "EvalPseudoLabels"),
    "stages.propagation.a2gnn": ("Propagate[propagation=a2gnn]",),
    "stages.propagation.dsrg": ("Propagate[propagation=dsrg]",),
    "stages.propagation.evaluate": ("EvalPseudoLabels",),
    "stages.propagation.gcn": ("Propagate[propagation=gcn]",),
    "stages.propagation.graphcut": ("Propagate[propagation=graphcut]",),
    "stages.propagation.method": ("Propagate",),
    "stages.propagation.propagate": ("Propagate",),
    "stages.propagation.random_walk": ("Propagate[propagation=gcn|rw_irn|rw_psa]",),
    "stages.propagation.rw_irn": ("Propagate[propagation=rw_irn]",),
    "stages.propagation.rw_psa": ("Propagate[propagation=rw_psa]",),
    "stages.propagation.seed_net": (SEED_NET_PROPAGATIONS,),
    "stages.refine": CRF_USERS,
    "stages.refine.crf": CRF_USERS,
    "stages.refine.permutohedral": CRF_USERS,
    "stages.refine.refine": ("RefineCRF",),
    "stages.report": ("Report",),
    "stages.report.build": ("Report",),
    "stages.report.colours": ("Report",),
    "stages.report.cooccurrence": ("Report",),
    "stages.report.html": ("Report",),
    "stages.runtime": TRAINERS,
    "stages.seed_net": SEED_NET,
    "stages.seed_net.graphcut": SEED_NET,
    "stages.seed_net.growing": SEED_NET,
    "stages.seed_net.train": SEED_NET,
    "stages.seeds": ("ExtractSeeds", "Propagate[propagation=gcn]", "EvalPseudoLabels"),
    "stages.seeds.extract": ("ExtractSeeds",),
    "stages.seeds.rules": ("ExtractSeeds", "Propagate[propagation=gcn]", "EvalPseudoLabels"),
    "stages.seeds.supervision": ("ExtractSeeds[supervision=box|point|scribble]",),
    "stages.segmentation": SEGMENTER_USERS,
    "stages.segmentation.model": SEGMENTER_USERS,
    "stages.segmentation.predict": ("EvalSegmentation", "Report"),     # the test-time CRF, PNGs and metrics
    "stages.segmentation.train": ("TrainSeedNet", SEED_NET_PROPAGATIONS, "TrainSegmentation"),
    "stages.training": TRAINERS,
    "stages.training.distributed": ("TrainCAM",),
    "stages.training.engine": TRAINERS,
    "stages.training.optim": TRAINERS,
}


def library_modules(root: Path) -> list[str]:
    return sorted(".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
                  for package in hashing.LIBRARY_PACKAGES for p in (root / package).rglob("*.py"))


def runs(entry: str, task) -> bool:
    family, _, condition = entry.partition("[")
    if task.get_task_family() != family:
        return False
    if not condition:
        return True
    knob, _, values = condition.rstrip("]").partition("=")
    return str(getattr(task, knob)) in values.split("|")


@pytest.fixture
def library(tmp_path, luigi_config, monkeypatch):
    """A private copy of the library that the hashing reads, and a function giving every stage's key."""
    for package in hashing.LIBRARY_PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(hashing, "PROJECT_ROOT", tmp_path)
    luigi_config("Report", "compare", "[" + ", ".join(f'"{spec}"' for spec in COMPARE) + "]")
    # DeepLab on each compared method's labels is the main DeepLab's stage and code again: left out for time.
    luigi_config("Report", "compare_segmentation", "false")

    def keys() -> dict[str, str]:
        luigi.task_register.Register.clear_instance_cache()
        return {name: task.key for name, task in stage_graph().items()}
    yield tmp_path, keys
    hashing.clear_cache()


def expected_changes(module: str, graph: dict) -> set[str]:
    """The stages of ``graph`` that run ``module`` and everything downstream of them, by stage name."""
    hit = {name for name, task in graph.items() if any(runs(entry, task) for entry in RUNS[module])}
    for name, task in graph.items():  # upstream first
        if any(up.stage_name in hit for up in task.upstream().values()):
            hit.add(name)
    return hit


def test_the_table_lists_every_library_module(library):
    root, _ = library
    assert sorted(RUNS) == library_modules(root)


def test_an_edit_changes_exactly_the_stages_that_run_the_module_and_what_follows(library):
    root, keys = library
    before = keys()
    assert len(before) > 40, "the compared methods must be part of the graph"
    graph = stage_graph()
    wrong = {}
    for module in library_modules(root):
        path = hashing.module_path(module)
        source = path.read_text()
        path.write_text(source + "\n_X = 1\n")
        changed = {name for name, key in keys().items() if key != before[name]}
        path.write_text(source)
        expected = expected_changes(module, graph)
        if changed != expected:
            wrong[module] = {"unexpected": sorted(changed - expected), "missing": sorted(expected - changed)}
    assert not wrong, wrong
    assert keys() == before, "reverting every edit restores every key"


def test_a_method_the_chain_does_not_run_changes_no_key(library, luigi_config):
    _, keys = library
    luigi_config("Report", "compare", "[]")
    before = keys()
    for module in ("stages.propagation.a2gnn", "stages.propagation.gcn", "stages.affinity.a2gnn",
                   "stages.seed_net.graphcut", "stages.seeds.supervision", "models.a2gnn", "models.seam",
                   "stages.cam.seam", "stages.propagation.rw_psa", "models.ddd", "models.deeplab_ddd", "models.gmnet"):
        path = hashing.module_path(module)
        source = path.read_text()
        path.write_text(source + "\n_X = 1\n")
        assert keys() == before, module
        path.write_text(source)


def test_comments_and_docstrings_change_no_key(library):
    _, keys = library
    before = keys()
    for module in ("stages.segmentation.predict", "stages.refine.crf", "models.deeplab", "data.io"):
        path = hashing.module_path(module)
        source = path.read_text()
        path.write_text(source.replace('"""', '"""Edited. ', 1) + "\n# a comment\n")
        assert keys() == before, module
        path.write_text(source)


def test_gmnet_and_ddd_edits_rekey_only_the_stages_that_build_them(library, luigi_config):
    """Each segmenter is a module of its own (models.segmenters): GMNet's and DDD's code reach only their stages."""
    _, keys = library
    luigi_config("Report", "compare", "[]")
    luigi_config("FullWSSS", "parts", "true")

    def changed_by(module: str) -> set[str]:
        before = keys()
        path = hashing.module_path(module)
        source = path.read_text()
        path.write_text(source + "\n_X = 1\n")
        after = keys()
        path.write_text(source)
        return {name for name in before if after[name] != before[name]}

    assert {name.partition("@")[0] for name in changed_by("models.gmnet")} == {"TrainPartSegmentation", "EvalParts"}
    assert changed_by("models.ddd") == set() and changed_by("models.deeplab_ddd") == set()
    luigi_config("TrainSegmentation", "model", "deeplabv3_ddd")
    families = {name.partition("@")[0] for name in changed_by("models.ddd")}
    assert {"TrainSegmentation", "EvalSegmentation", "Report"} <= families
    assert not families & {"TrainCAM", "TrainAffinity", "TrainPartSegmentation-none"}

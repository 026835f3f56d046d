"""Presets as deltas on a base (pipeline/presets.py): a preset means the same values from any directory, and every
value that differs from the code defaults is set by the preset or a base it names, never by ./luigi.cfg."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import luigi
import luigi.configuration
import pytest
from luigi.configuration import LuigiConfigParser

from data.synthetic import PROFILES
from pipeline import cli, presets
from pipeline.checks import validate_config
from stages.auto import DatasetScale, fit_knobs
from stages.config import AUTO_KNOBS, STAGE_CONFIGS, all_knobs, parse_auto

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "configs" / "demo.cfg"
PRESET_FILES = [*sorted((REPO / "configs").glob("*.cfg")), REPO / "luigi.cfg"]

# What `make demo` ran before presets had bases (`luigi --module pipeline FullWSSS` at the repository root, no
# $LUIGI_CONFIG_PATH): the stages/config.py defaults with the values ./luigi.cfg then held on top.
DEMO_VALUES: dict[str, dict[str, object]] = {
    "wsss": {"work_dir": "work", "device": "auto", "loader_workers": 1, "torch_threads": 0},
    "PrepareDataset": {"kind": "synthetic", "profile": "demo", "seed": 0},
    "PretrainBackbone": {"backbone": "resnet_mini", "steps": 4000},
    "TrainCAM": {"backbone": "resnet_mini", "pretrained": "synthetic", "num_epochs": 30, "seed": 0,
                 "resize_long": "auto:0.556,1.111", "crop_size": "auto:0.78"},
    "MakeCAM": {"scales": (1.0, 0.5, 1.5, 2.0), "shard_size": 256},
    "EvalCAM": {"bg_threshold": 0.15},
    "ExtractSeeds": {"seed_method": "irn", "fg_threshold": 0.30, "bg_threshold": 0.05},
    "TrainAffinity": {"affinity_method": "irnet", "backbone": "resnet_mini", "init_from_cam": True,
                      "num_epochs": "auto:11.7", "crop_size": "auto:0.78"},
    # auto: fitted to the demo's images when Propagate runs, 16 and 2 as before (tests/test_auto_knobs.py); IRN's
    # walk a fixed 8, measured at two image sizes (configs/demo.cfg). The main chain propagates with WSGCN's GCN
    # and its CRF (IRN's walk and A2GNN's CRF until DeepLab's share of the ceiling was measured on `double`).
    "Propagate": {"propagation": "gcn", "beta": 10.0, "steps": 8, "radius": 5, "bg_threshold": 0.25,
                  "gcn_walk_steps": "auto", "a2gnn_rw_logt": "auto"},
    "EvalPseudoLabels": {"pred_ignore": "background"},
    "RefineCRF": {"preset": "method"},
    "TrainSeedNet": {"backbone": "resnet_mini", "pretrained": "synthetic", "crop_size": "auto:0.78",
                     "iterations": "auto:5.5"},
    "TrainSegmentation": {"model": "deeplabv2", "backbone": "resnet_mini", "pretrained": "synthetic",
                          "iterations": "auto:36.4", "crop_size": "auto:0.78", "eval_every": 4},
    "EvalSegmentation": {"scales": (0.75, 1.0, 1.25), "flip": True, "crf": True},
}

# The files each preset reads, in order, from any directory.
CHAINS = {
    None: ["luigi.cfg", "configs/demo.cfg"],
    "luigi.cfg": ["luigi.cfg", "configs/demo.cfg"],
    "configs/cluster.cfg": ["luigi.cfg", "configs/demo.cfg", "configs/cluster.cfg"],
    "configs/demo.cfg": ["luigi.cfg", "configs/demo.cfg"],
    "configs/demo_seam.cfg": ["luigi.cfg", "configs/demo.cfg", "configs/demo_seam.cfg"],
    "configs/demo_compare.cfg": ["luigi.cfg", "configs/demo.cfg", "configs/demo_compare.cfg"],
    "configs/tiny.cfg": ["luigi.cfg", "configs/tiny.cfg"],
    "configs/voc.cfg": ["luigi.cfg", "configs/voc.cfg"],
    "configs/voc_seam.cfg": ["luigi.cfg", "configs/voc.cfg", "configs/voc_seam.cfg"],
    **{f"configs/{p}_{m}.cfg": ["luigi.cfg", f"configs/{p}.cfg", f"configs/{p}_{m}.cfg"]
       for p in ("demo", "voc") for m in ("psa", "wsgcn", "dgcn", "dsrg")},
    **{f"configs/{p}_a2gnn{s}.cfg": ["luigi.cfg", f"configs/{p}.cfg", f"configs/{p}_seam.cfg", f"configs/{p}_a2gnn.cfg",
                                      *([f"configs/{p}_a2gnn{s}.cfg"] if s else [])]
       for p in ("demo", "voc") for s in ("", "_point", "_scribble", "_box")},
}

Values = dict[tuple[str, str], object]


def typed(default: object, text: str, auto: bool = False) -> object:
    """A config text as the task parameter made from ``default`` parses it (pipeline.framework); ``auto``: a knob
    of stages.config.AUTO_KNOBS."""
    if auto:
        return parse_auto(text, pair=isinstance(default, tuple))
    if isinstance(default, bool):
        return luigi.BoolParameter(parsing=luigi.BoolParameter.EXPLICIT_PARSING).parse(text)
    if isinstance(default, int):
        return luigi.IntParameter().parse(text)
    if isinstance(default, float):
        return luigi.FloatParameter().parse(text)
    if isinstance(default, tuple):
        return luigi.TupleParameter().parse(text)
    return text


def values_in_force() -> Values:
    """Every knob's value as the tasks would see it (no command-line flags)."""
    table = presets.effective()
    values: Values = {}
    for section, knobs in all_knobs().items():
        for name, default in knobs.items():
            text, source = table[section][name]
            auto = name in AUTO_KNOBS.get(section, {})
            values[section, name] = default if source == "default" else typed(default, str(text), auto)
    return values


def defaults() -> Values:
    return {(section, name): default for section, knobs in all_knobs().items() for name, default in knobs.items()}


def _set_sections(parser: LuigiConfigParser, sections: dict[str, dict[str, str]]) -> None:
    for section in parser.sections():
        parser.remove_section(section)
    for section, options in sections.items():
        parser.add_section(section)
        for option, value in options.items():
            parser.set(section, option, value)


@pytest.fixture
def load(monkeypatch):
    """Load a preset as ``luigi --module pipeline`` does: Luigi's search list plus $LUIGI_CONFIG_PATH, then the
    chain pipeline.presets installs; returns the files read. Luigi's configuration is restored afterwards."""
    parser = luigi.configuration.get_config()
    saved_paths = LuigiConfigParser._config_paths
    saved = {section: dict(parser.items(section, raw=True)) for section in parser.sections()}

    def _load(selected: str | Path | None, cwd: Path) -> list[Path]:
        monkeypatch.chdir(cwd)
        if selected is None:
            monkeypatch.delenv("LUIGI_CONFIG_PATH", raising=False)
        else:
            monkeypatch.setenv("LUIGI_CONFIG_PATH", str(selected))
        _set_sections(parser, {})
        LuigiConfigParser._config_paths = [*presets.LUIGI_SEARCH_PATH, *([str(selected)] if selected else [])]
        files = presets.install()
        luigi.task_register.Register.clear_instance_cache()
        return files

    yield _load
    LuigiConfigParser._config_paths = saved_paths
    _set_sections(parser, saved)
    luigi.task_register.Register.clear_instance_cache()


def _selections(name: str | None, elsewhere: Path) -> list[tuple[str | None, Path]]:
    """How a preset is selected from the repository root (as the Makefile does) and from another directory."""
    if name is None:
        return [(None, REPO), (None, elsewhere)]
    return [(name, REPO), (str(REPO / name), elsewhere)]


def _name(path: Path) -> str:
    return str(path.relative_to(REPO))


@pytest.mark.parametrize("name", [None, *(_name(p) for p in PRESET_FILES)])
def test_a_preset_means_the_same_values_from_any_directory(load, tmp_path, name):
    seen = []
    for selected, cwd in _selections(name, tmp_path):
        files = load(selected, cwd)
        seen.append(([presets.describe(p) for p in files], values_in_force()))
        assert luigi.configuration.get_config().get("retcode", "task_failed") == "30"  # a failed run exits 30
    assert seen[0][0] == seen[1][0]
    assert seen[0][1] == seen[1][1]


@pytest.mark.parametrize("name", [None, *(_name(p) for p in PRESET_FILES)])
def test_every_value_off_the_defaults_comes_from_the_preset_or_its_bases(load, tmp_path, name):
    files = load(None if name is None else REPO / name, tmp_path)
    allowed = set() if name is None else set(presets.chain(REPO / name))
    if name is None or not presets.is_preset(REPO / name):  # a bare run or a runtime layer: luigi.cfg's default
        allowed |= set(presets.chain(DEMO))
    origin = presets.sources(files)
    default = defaults()
    for (section, knob), value in values_in_force().items():
        if value != default[section, knob]:
            source = origin[section, knob]
            assert source in allowed or (section == "wsss" and source == presets.PROJECT_CFG), \
                f"{name}: {section}.{knob} = {value!r} comes from {source}, outside the preset's chain"


@pytest.mark.parametrize("name", list(CHAINS))
def test_each_preset_reads_its_bases_and_nothing_else(load, tmp_path, name):
    files = load(None if name is None else REPO / name, tmp_path)
    assert [presets.describe(p) for p in files] == CHAINS[name]


@pytest.mark.parametrize("selected", [None, "luigi.cfg", "configs/demo.cfg"])
def test_the_demo_runs_the_values_it_always_ran(load, tmp_path, selected):
    expected = defaults()
    expected.update({(section, knob): value for section, knobs in DEMO_VALUES.items() for knob, value in knobs.items()})
    for chosen, cwd in _selections(selected, tmp_path):
        load(chosen, cwd)
        assert values_in_force() == expected


def test_voc_walks_as_the_references_and_trains_full_size_networks(load, tmp_path):
    for preset in ("configs/voc.cfg", "configs/voc_seam.cfg"):
        for selected, cwd in _selections(preset, tmp_path):
            load(selected, cwd)
            values = values_in_force()
            assert values["Propagate", "gcn_walk_steps"] == 256
            assert values["Propagate", "a2gnn_rw_logt"] == 6
            assert values["Propagate", "steps"] == (256 if preset == "configs/voc.cfg" else 64)
            for stage in ("TrainSeedNet", "TrainSegmentation"):
                assert values[stage, "backbone"] == "resnet101"
                assert values[stage, "pretrained"] == ""  # ImageNet weights are passed on the command line
            assert values["TrainSegmentation", "iterations"] == 20000
            assert values["TrainSegmentation", "crop_size"] == 321


def test_tiny_reads_the_same_without_the_chain(load, tmp_path):
    """conftest.luigi_config and the cluster tests read luigi.cfg + tiny.cfg with a plain parser: tiny.cfg must
    not depend on a base."""
    load(REPO / "configs" / "tiny.cfg", tmp_path)
    chained = values_in_force()
    parser = luigi.configuration.get_config()
    _set_sections(parser, {})
    parser.read([str(REPO / "luigi.cfg"), str(REPO / "configs" / "tiny.cfg")])
    assert values_in_force() == chained


def test_a_runtime_layer_gets_the_demo_and_a_preset_without_base_does_not(load, tmp_path):
    layer = tmp_path / "layer.cfg"
    layer.write_text("[wsss]\nwork_dir = /scratch/work\n")
    load(layer, tmp_path)
    assert values_in_force()["Propagate", "steps"] == 8
    own = tmp_path / "own.cfg"
    own.write_text("[TrainCAM]\nnum_epochs = 5\n")
    load(own, tmp_path)
    assert values_in_force()["Propagate", "steps"] == 256
    assert values_in_force()["TrainCAM", "num_epochs"] == 5


def test_several_bases_are_read_in_order(load, tmp_path):
    combined = tmp_path / "voc_cluster.cfg"
    combined.write_text(f"[preset]\nbase = {REPO / 'configs/voc.cfg'}\n       {REPO / 'configs/cluster.cfg'}\n\n"
                        "[TrainCAM]\nnum_epochs = 4\n")
    files = load(combined, tmp_path)
    assert [presets.describe(p) for p in files] == ["luigi.cfg", "configs/voc.cfg", "configs/cluster.cfg",
                                                     str(combined.resolve())]
    parser = luigi.configuration.get_config()
    assert parser.get("core", "local_scheduler") == "false" and parser.get("retcode", "not_run") == "0"
    assert values_in_force()["Propagate", "gcn_walk_steps"] == 256
    assert values_in_force()["TrainCAM", "num_epochs"] == 4


def test_a_copied_preset_finds_its_base_among_the_project_presets(load, tmp_path):
    """The Slurm template runs a copy of the preset written to $TMPDIR: ``base = voc.cfg`` is then configs/voc.cfg."""
    load("configs/voc_seam.cfg", REPO)
    original = values_in_force()
    copy = tmp_path / "job.cfg"
    copy.write_text((REPO / "configs" / "voc_seam.cfg").read_text())
    files = load(copy, tmp_path)
    assert REPO / "configs" / "voc.cfg" in files
    assert values_in_force() == original


@pytest.mark.parametrize("text, message", [
    ("[preset]\nbase = missing.cfg\n", r"bad\.cfg: \[preset\] base = missing\.cfg: no such file"),
    ("[preset]\nbases = demo.cfg\n", r"bad\.cfg: \[preset\] has unknown key\(s\) bases"),
    ("[preset]\nbase = bad.cfg\n", r"bad\.cfg: \[preset\] base chain loops"),
    ("[TrainCAM\nlr = 1\n", r"bad\.cfg: cannot read"),
])
def test_resolution_errors_name_the_file(load, tmp_path, text, message):
    bad = tmp_path / "bad.cfg"
    bad.write_text(text)
    with pytest.raises(presets.PresetError, match=message):
        load(bad, tmp_path)


def test_a_missing_selected_file_is_an_error(load, tmp_path):
    with pytest.raises(presets.PresetError, match=r"LUIGI_CONFIG_PATH=configs/voc\.cfg: no such file"):
        load("configs/voc.cfg", tmp_path)


def test_config_prints_each_value_and_its_file(load, tmp_path, capsys):
    load(REPO / "configs" / "voc_seam.cfg", tmp_path)
    assert cli.main(["config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = " ".join(line[2:] for line in lines[:lines.index("")])
    assert "luigi.cfg, configs/voc.cfg, configs/voc_seam.cfg." in header
    # each value's line follows its comment, which ends with the file the value comes from
    rows = {line: lines[i - 1].rsplit("[", 1)[1].rstrip("]") for i, line in enumerate(lines) if " = " in line
            and not line.startswith("#")}
    assert rows["steps = 64"] == "configs/voc_seam.cfg"
    assert rows["iterations = 20000"] == "configs/voc.cfg"
    assert rows["gcn_walk_steps = 256"] == "configs/voc.cfg"
    assert rows["a2gnn_hidden = 256"] == "default"
    assert rows["task_failed = 30"] == "luigi.cfg"


# The data each preset was written for: VOC's train_aug (median 500 x 375) and the embedded demo profile.
WRITTEN_FOR = {"voc": DatasetScale(375, 500, 10582),
               "demo": DatasetScale(PROFILES["demo"].height, PROFILES["demo"].width, PROFILES["demo"].n_train)}
DOUBLE = DatasetScale(PROFILES["double"].height, PROFILES["double"].width, PROFILES["double"].n_train)
# What make demo runs on the demo's data, its `auto` values resolved (as before they were `auto`, but DeepLab's 3,000).
DEMO_FITTED = {("Propagate", "steps"): 8, ("Propagate", "gcn_walk_steps"): 16, ("Propagate", "a2gnn_rw_logt"): 2,
               ("TrainAffinity", "num_epochs"): 15, ("TrainSegmentation", "iterations"): 3000,
               ("TrainSeedNet", "iterations"): 450, ("TrainAffinity", "crop_size"): 112,
               ("TrainSegmentation", "crop_size"): 112, ("TrainSeedNet", "crop_size"): 112,
               ("TrainCAM", "resize_long"): (80, 160), ("TrainCAM", "crop_size"): 112}
# The affinity nets of the other demo presets: what they set by hand before these knobs were `auto`.
HAND_SET_BEFORE = {
    **{f"configs/{name}.cfg": {("TrainAffinity", "num_epochs"): 5, ("TrainAffinity", "crop_size"): 112,
                               ("TrainCAM", "resize_long"): (80, 160), ("TrainCAM", "crop_size"): 112}
       for name in ("demo_psa", "demo_seam")},
    "configs/demo_a2gnn.cfg": {("TrainAffinity", "num_epochs"): 12, ("TrainAffinity", "crop_size"): 112},
}
# each propagation method reads its own walk length: every one is resolved (and checked) under its method
PROPAGATIONS = ("rw_irn", "gcn", "a2gnn")


def fitted_sections(values: Values, scale: DatasetScale) -> tuple[dict, list[str]]:
    """Every auto-capable section's knobs as ``auto`` resolves them on ``scale``, and the warnings."""
    resolved, warnings = {}, []
    for section, rules in AUTO_KNOBS.items():
        cls = STAGE_CONFIGS[section]
        cfg = cls(**{f.name: values[section, f.name] for f in dataclasses.fields(cls)})
        variants = [dataclasses.replace(cfg, propagation=p) for p in PROPAGATIONS] if section == "Propagate" else [cfg]
        for variant in variants:
            fitted, _, found = fit_knobs(variant, scale)
            resolved.update({(section, k): getattr(fitted, k) for k, rule in rules.items() if rule.is_read(variant)})
            warnings += [w for w in found if w not in warnings]
    return resolved, warnings


@pytest.mark.parametrize("name", [_name(p) for p in PRESET_FILES if p.name.startswith(tuple(WRITTEN_FOR))])
def test_no_preset_warns_about_scale_on_the_data_it_was_written_for(load, tmp_path, name):
    load(REPO / name, tmp_path)
    values = values_in_force()
    for section in AUTO_KNOBS if name.startswith("configs/demo") else ():   # (voc*.cfg need the user's weights)
        cls = STAGE_CONFIGS[section]        # its auto values pass the checks made while scheduling
        validate_config(cls(**{f.name: values[section, f.name] for f in dataclasses.fields(cls)}), section)
    resolved, warnings = fitted_sections(values_in_force(), WRITTEN_FOR[Path(name).name.split("_")[0].split(".")[0]])
    assert warnings == []
    if name == "configs/demo.cfg":
        assert resolved == DEMO_FITTED
    for (section, knob), value in HAND_SET_BEFORE.get(name, {}).items():
        assert resolved[section, knob] == value, (name, section, knob)
    if name.startswith("configs/demo"):   # nor on images of twice the side (the `double` profile)
        assert fitted_sections(values_in_force(), DOUBLE)[1] == []

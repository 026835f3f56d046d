"""Adding a propagation method is one module with a ``METHOD`` record plus one registry line (README, "Adding a
method"): the stage, its key and ``Report.compare`` then pick it up with nothing else to edit."""

from __future__ import annotations

import shutil
import sys
import textwrap

import luigi
import numpy as np
import pytest
import torch
from conftest import REPO

import stages.propagation
from pipeline import hashing
from pipeline.tasks import Propagate, TrainAffinity
from pipeline.variants import variant_overrides
from stages.config import PropagateConfig
from stages.propagation import PROPAGATION_METHODS
from stages.propagation.propagate import propagation_method, validate_propagation

METHOD_SOURCE = '''
from stages.propagation.method import AFFINITY_NET, PropagationMethod
from stages.propagation.random_walk import propagate_irn


def run(cfg, cams, inputs, size, device):
    return propagate_irn(cams["cam"], inputs["boundary"], size, beta=cfg.beta, steps=cfg.steps,
                         radius=cfg.radius, bg_threshold=cfg.bg_threshold, device=device)


METHOD = PropagationMethod(name="rw_top1", run=run, trained_by=AFFINITY_NET, affinity_method="irnet",
                           reference="a test")
'''


@pytest.fixture
def new_method(tmp_path, monkeypatch, luigi_config):
    """A copy of the library with ``stages/propagation/rw_top1.py`` added and registered."""
    for package in hashing.LIBRARY_PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "stages" / "propagation" / "rw_top1.py").write_text(textwrap.dedent(METHOD_SOURCE))
    monkeypatch.setattr(hashing, "PROJECT_ROOT", tmp_path)
    monkeypatch.setattr(stages.propagation, "__path__", [*stages.propagation.__path__,
                                                         str(tmp_path / "stages" / "propagation")])
    monkeypatch.setitem(PROPAGATION_METHODS._entries, "rw_top1", "stages.propagation.rw_top1:METHOD")  # the line
    yield
    sys.modules.pop("stages.propagation.rw_top1", None)
    hashing.clear_cache()
    luigi.task_register.Register.clear_instance_cache()


def test_a_new_method_module_is_a_propagation_method(new_method):
    method = propagation_method("rw_top1")
    cfg = PropagateConfig(propagation="rw_top1", steps=4, radius=2)
    validate_propagation(cfg, affinity_method="irnet")
    with pytest.raises(ValueError, match="affinity_method"):
        validate_propagation(cfg, affinity_method="affinitynet")
    rng = np.random.default_rng(0)
    cams = {"cam": rng.random((2, 6, 8)).astype(np.float32)}
    probs, index = method.run(cfg, cams, {"boundary": rng.random((6, 8)).astype(np.float32)}, (24, 32),
                              torch.device("cpu"))
    assert probs.shape == (3, 24, 32) and index.shape == (24, 32)


def test_the_stage_and_the_comparison_pick_it_up(new_method, luigi_config):
    assert variant_overrides("rw_top1") == {"Propagate": {"propagation": "rw_top1"},
                                            "TrainAffinity": {"affinity_method": "irnet"}}
    luigi_config("Propagate", "propagation", "rw_top1")
    task = Propagate()
    assert isinstance(task.trainer, TrainAffinity)
    assert "stages.propagation.rw_top1" in task.code_modules
    assert "stages.propagation.gcn" not in task.code_modules

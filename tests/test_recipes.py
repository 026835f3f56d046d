"""Every method's reference recipe as a preset (configs/voc_*.cfg), held against the values of the reference code
as the shared research notes record them, section by section; and the comparison that runs each recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.variants import MAIN_CHAIN, comparison, recipe_values
from stages.config import STAGE_CONFIGS

REPO = Path(__file__).resolve().parent.parent
IPW = "irn_psa_wsgcn.md"
SAD = "seam_a2gnn_dgcn.md"

# (section, knob): (reference value, where the research notes give it)
IRN = {
    ("TrainCAM", "backbone"): ("resnet50", f"{IPW} §1.2"),
    ("TrainCAM", "strides"): ((1, 2, 2, 1), f"{IPW} §1.2 (layer4 not downsampled: OS 16)"),
    ("TrainCAM", "freeze_bn"): (True, f"{IPW} §1.2"),
    ("TrainCAM", "frozen_stages"): (2, f"{IPW} §1.2 (conv1 .. layer2 never update)"),
    ("TrainCAM", "num_epochs"): (5, f"{IPW} §1.2"),
    ("TrainCAM", "batch_size"): (16, f"{IPW} §1.2"),
    ("TrainCAM", "lr"): (0.1, f"{IPW} §1.2"),
    ("TrainCAM", "head_lr_mult"): (10.0, f"{IPW} §1.2"),
    ("TrainCAM", "weight_decay"): (1e-4, f"{IPW} §1.2"),
    ("TrainCAM", "momentum_quirk"): (True, f"{IPW} §1.2 (PolyOptimizer quirk)"),
    ("TrainCAM", "resize_long"): ((320, 640), f"{IPW} §1.2"),
    ("TrainCAM", "crop_size"): (512, f"{IPW} §1.2"),
    ("MakeCAM", "scales"): ((1.0, 0.5, 1.5, 2.0), f"{IPW} §1.3"),
    ("MakeCAM", "flip"): (True, f"{IPW} §1.3"),
    ("ExtractSeeds", "seed_method"): ("irn", f"{IPW} §1.5"),
    ("ExtractSeeds", "fg_threshold"): (0.30, f"{IPW} §1.5"),
    ("ExtractSeeds", "bg_threshold"): (0.05, f"{IPW} §1.5"),
    ("ExtractSeeds", "label_crf_gt_prob"): (0.7, f"{IPW} §1.5"),
    ("ExtractSeeds", "label_crf_bilateral"): ((50.0, 5.0, 10.0), f"{IPW} §1.5"),
    ("TrainAffinity", "affinity_method"): ("irnet", f"{IPW} §1.6"),
    ("TrainAffinity", "backbone"): ("resnet50", f"{IPW} §1.6"),
    ("TrainAffinity", "init_from_cam"): (False, f"{IPW} §1.6 (a separate ImageNet ResNet-50)"),
    ("TrainAffinity", "freeze_backbone"): (True, f"{IPW} §1.6"),
    ("TrainAffinity", "radius"): (10, f"{IPW} §1.7"),
    ("TrainAffinity", "num_epochs"): (3, f"{IPW} §1.7"),
    ("TrainAffinity", "batch_size"): (32, f"{IPW} §1.7"),
    ("TrainAffinity", "lr"): (0.1, f"{IPW} §1.7"),
    ("TrainAffinity", "weight_decay"): (1e-4, f"{IPW} §1.7"),
    ("TrainAffinity", "momentum_quirk"): (True, f"{IPW} §1.7 (same PolyOptimizer)"),
    ("TrainAffinity", "scale_range"): ((0.5, 1.5), f"{IPW} §1.7"),
    ("TrainAffinity", "crop_size"): (512, f"{IPW} §1.7"),
    ("Propagate", "propagation"): ("rw_irn", f"{IPW} §1.8"),
    ("Propagate", "beta"): (10.0, f"{IPW} §1.8"),
    ("Propagate", "steps"): (256, f"{IPW} §1.8"),
    ("Propagate", "radius"): (5, f"{IPW} §1.8"),
    ("Propagate", "bg_threshold"): (0.25, f"{IPW} §1.8"),
}
PSA = {
    ("TrainCAM", "cam_method"): ("psa", f"{IPW} §2.3"),
    ("TrainCAM", "backbone"): ("resnet38", f"{IPW} §2.2"),
    ("TrainCAM", "freeze_bn"): (True, f"{IPW} §2.2"),
    ("TrainCAM", "frozen_stages"): (2, f"{IPW} §2.2 (conv1a, b2, b2_1, b2_2)"),
    ("TrainCAM", "num_epochs"): (15, f"{IPW} §2.3"),
    ("TrainCAM", "batch_size"): (16, f"{IPW} §2.3"),
    ("TrainCAM", "lr"): (0.1, f"{IPW} §2.3"),
    ("TrainCAM", "weight_decay"): (5e-4, f"{IPW} §2.3"),
    ("TrainCAM", "momentum_quirk"): (True, f"{IPW} §2.3"),
    ("TrainCAM", "resize_long"): ((256, 512), f"{IPW} §2.3"),
    ("TrainCAM", "crop_size"): (448, f"{IPW} §2.3"),
    ("TrainCAM", "color_jitter"): (0.3, f"{IPW} §2.3"),
    ("MakeCAM", "scales"): ((1.0, 0.5, 1.5, 2.0), f"{IPW} §2.4"),
    ("ExtractSeeds", "seed_method"): ("psa", f"{IPW} §2.4"),
    ("ExtractSeeds", "alpha_low"): (4.0, f"{IPW} §2.4"),
    ("ExtractSeeds", "alpha_high"): (32.0, f"{IPW} §2.4"),
    ("ExtractSeeds", "crf_gaussian"): ((3.0, 3.0), f"{IPW} §2.4"),
    ("ExtractSeeds", "score_crf_bilateral"): ((80.0, 13.0, 10.0), f"{IPW} §2.4"),
    ("TrainAffinity", "affinity_method"): ("affinitynet", f"{IPW} §2.5"),
    ("TrainAffinity", "backbone"): ("resnet38", f"{IPW} §2.2"),
    ("TrainAffinity", "freeze_backbone"): (False, f"{IPW} §2.2"),
    ("TrainAffinity", "frozen_early_blocks"): (True, f"{IPW} §2.2 (conv1a, b2, b2_1, b2_2 frozen)"),
    ("TrainAffinity", "radius"): (5, f"{IPW} §2.5"),
    ("TrainAffinity", "num_epochs"): (8, f"{IPW} §2.6"),
    ("TrainAffinity", "batch_size"): (8, f"{IPW} §2.6"),
    ("TrainAffinity", "lr"): (0.1, f"{IPW} §2.6"),
    ("TrainAffinity", "weight_decay"): (5e-4, f"{IPW} §2.6"),
    ("TrainAffinity", "momentum_quirk"): (True, f"{IPW} §2.3, §2.6"),
    ("TrainAffinity", "scale_range"): ((1.0, 1.0), f"{IPW} §2.6 (no random rescale)"),
    ("TrainAffinity", "crop_size"): (448, f"{IPW} §2.6"),
    ("TrainAffinity", "color_jitter"): (0.3, f"{IPW} §2.6"),
    ("Propagate", "propagation"): ("rw_psa", f"{IPW} §2.7"),
    ("Propagate", "beta"): (8.0, f"{IPW} §2.7"),
    ("Propagate", "steps"): (256, f"{IPW} §2.7"),
    ("Propagate", "radius"): (5, f"{IPW} §2.7"),
    ("Propagate", "alpha"): (16.0, f"{IPW} §2.7"),
}
SEAM = {
    ("TrainCAM", "cam_method"): ("seam", f"{SAD} §1.3"),
    ("TrainCAM", "backbone"): ("resnet38", f"{SAD} §1.2"),
    ("TrainCAM", "num_epochs"): (8, f"{SAD} §1.4"),
    ("TrainCAM", "batch_size"): (8, f"{SAD} §1.4"),
    ("TrainCAM", "lr"): (0.01, f"{SAD} §1.4"),
    ("TrainCAM", "weight_decay"): (5e-4, f"{SAD} §1.4"),
    ("TrainCAM", "momentum_quirk"): (True, f"{SAD} §1.2 (optimizer quirk)"),
    ("TrainCAM", "resize_long"): ((448, 768), f"{SAD} §1.4"),
    ("TrainCAM", "crop_size"): (448, f"{SAD} §1.4"),
    ("TrainCAM", "color_jitter"): (0.3, f"{SAD} §1.4"),
    ("TrainCAM", "seam_rescale"): (0.3, f"{SAD} §1.4"),
    ("TrainCAM", "seam_ecr_top"): (0.2, f"{SAD} §1.4"),
    ("TrainCAM", "seam_min_pool"): (0.25, f"{SAD} §1.4"),
    ("ExtractSeeds", "seed_method"): ("psa", f"{SAD} §1.5"),
    ("ExtractSeeds", "alpha_low"): (4.0, f"{SAD} §1.5"),
    ("ExtractSeeds", "alpha_high"): (24.0, f"{SAD} §1.5"),
    ("TrainAffinity", "affinity_method"): ("affinitynet", f"{SAD} §1.6"),
    ("TrainAffinity", "backbone"): ("resnet38", f"{SAD} §1.6"),
    ("TrainAffinity", "init_from_cam"): (False, f"{SAD} §1.6 (ImageNet, not the SEAM model)"),
    ("TrainAffinity", "frozen_early_blocks"): (True, f"{SAD} §1.2"),
    ("TrainAffinity", "num_epochs"): (8, f"{SAD} §1.6"),
    ("TrainAffinity", "batch_size"): (8, f"{SAD} §1.6"),
    ("TrainAffinity", "lr"): (0.01, f"{SAD} §1.6"),
    ("TrainAffinity", "weight_decay"): (5e-4, f"{SAD} §1.6"),
    ("TrainAffinity", "momentum_quirk"): (True, f"{SAD} §1.2"),
    ("TrainAffinity", "scale_range"): ((1.0, 1.0), f"{SAD} §1.6"),
    ("TrainAffinity", "crop_size"): (448, f"{SAD} §1.6"),
    ("Propagate", "propagation"): ("rw_psa", f"{SAD} §1.6"),
    ("Propagate", "beta"): (8.0, f"{SAD} §1.6"),
    ("Propagate", "steps"): (64, f"{SAD} §1.6 (2^6)"),
    ("Propagate", "alpha"): (6.0, f"{SAD} §1.6"),
}
WSGCN = {
    ("Propagate", "propagation"): ("gcn", f"{IPW} §3.5"),
    ("Propagate", "gcn_walk_steps"): (256, f"{IPW} §3.2"),
    ("Propagate", "gcn_adjacency"): ("dense", f"{IPW} §3.4"),
    ("Propagate", "gcn_alpha_low"): (4.0, f"{IPW} §3.3"),
    ("Propagate", "gcn_alpha_high"): (32.0, f"{IPW} §3.3"),
    ("Propagate", "gcn_crf_gaussian"): ((4.0, 3.0), f"{IPW} §3.3"),
    ("Propagate", "gcn_crf_bilateral"): ((20.0, 3.0, 10.0), f"{IPW} §3.3"),
    ("Propagate", "gcn_top_fraction"): (0.3, f"{IPW} §3.3"),
    ("Propagate", "gcn_cam_floor"): (0.1, f"{IPW} §3.3"),
    ("Propagate", "gcn_bg_confidence"): (0.8, f"{IPW} §3.3"),
    ("Propagate", "gcn_crf_confidence"): (0.8, f"{IPW} §3.3"),
    ("Propagate", "gcn_hidden"): (16, f"{IPW} §3.5"),
    ("Propagate", "gcn_dropout"): (0.3, f"{IPW} §3.5"),
    ("Propagate", "gcn_lr"): (0.01, f"{IPW} §3.5"),
    ("Propagate", "gcn_weight_decay"): (5e-4, f"{IPW} §3.5"),
    ("Propagate", "gcn_epochs"): (250, f"{IPW} §3.5"),
    ("Propagate", "gcn_entropy_weight"): (10.0, f"{IPW} §3.5"),
    ("Propagate", "gcn_smooth_weight"): (0.01, f"{IPW} §3.5"),
    ("RefineCRF", "preset"): ("method", f"{IPW} §3.6 (CRF.py: the gcn record's wsgcn_final)"),
    ("EvalPseudoLabels", "pred_ignore"): ("exclude", f"{IPW} §7.1 (WSGCN ignores predicted 255)"),
}
A2GNN = {
    ("TrainCAM", "cam_method"): ("seam", f"{SAD} §2.1 (built on SEAM)"),
    ("ExtractSeeds", "seed_method"): ("a2gnn", f"{SAD} §2.2"),
    ("ExtractSeeds", "alpha_low"): (4.0, f"{SAD} §2.2"),
    ("ExtractSeeds", "alpha_high"): (24.0, f"{SAD} §2.2"),
    ("ExtractSeeds", "top_fraction"): (0.4, f"{SAD} §2.2"),
    ("ExtractSeeds", "bg_confidence"): (0.8, f"{SAD} §2.2"),
    ("ExtractSeeds", "crf_confidence"): (0.8, f"{SAD} §2.2"),
    ("TrainAffinity", "affinity_method"): ("a2gnn", f"{SAD} §2.4"),
    ("TrainAffinity", "backbone"): ("resnet38", f"{SAD} §2.4"),
    ("TrainAffinity", "window_radius"): (3, f"{SAD} §2.4 (image, point)"),
    ("TrainAffinity", "gated_weight"): (3.0, f"{SAD} §2.4"),
    ("TrainAffinity", "gated_sigma_rgb"): (0.1, f"{SAD} §2.4"),
    ("TrainAffinity", "gated_sigma_xy"): (6.0, f"{SAD} §2.4"),
    ("TrainAffinity", "frozen_early_blocks"): (True, f"{SAD} §1.2"),
    ("TrainAffinity", "num_epochs"): (12, f"{SAD} §2.4"),
    ("TrainAffinity", "batch_size"): (4, f"{SAD} §2.4"),
    ("TrainAffinity", "lr"): (0.01, f"{SAD} §2.4"),
    ("TrainAffinity", "weight_decay"): (5e-4, f"{SAD} §2.4"),
    ("TrainAffinity", "momentum_quirk"): (True, f"{SAD} §2.4 (same PolyOptimizer quirk)"),
    ("TrainAffinity", "scale_range"): ((1.0, 1.0), f"{SAD} §2.4 (no random resize)"),
    ("TrainAffinity", "crop_size"): (448, f"{SAD} §2.4"),
    ("Propagate", "propagation"): ("a2gnn", f"{SAD} §2.5"),
    ("Propagate", "a2gnn_hidden"): (256, f"{SAD} §2.5"),
    ("Propagate", "a2gnn_layers"): (3, f"{SAD} §2.5"),
    ("Propagate", "a2gnn_dropout"): (0.5, f"{SAD} §2.5"),
    ("Propagate", "a2gnn_affinity_weight"): (10.0, f"{SAD} §2.5"),
    ("Propagate", "a2gnn_rw_weight"): (3.0, f"{SAD} §2.5"),
    ("Propagate", "a2gnn_rw_beta"): (8.0, f"{SAD} §2.5"),
    ("Propagate", "a2gnn_rw_logt"): (6, f"{SAD} §2.5"),
    ("Propagate", "a2gnn_rw_alpha"): (6.0, f"{SAD} §2.5"),
    ("RefineCRF", "preset"): ("method", f"{SAD} §2.5 (crf_inference_inf: the a2gnn record's a2gnn_final)"),
}
DGCN = {
    ("Propagate", "propagation"): ("graphcut", f"{SAD} §3.3"),
    ("TrainSeedNet", "method"): ("graphcut", f"{SAD} §3.3"),
    ("TrainSeedNet", "backbone"): ("resnet101", f"{SAD} §3.2"),
    ("TrainSeedNet", "head"): ("dilated12", f"{SAD} §3.2 (one 3x3 classifier, dilation 12)"),
    ("TrainSeedNet", "freeze_bn"): (True, f"{SAD} §3.2 (BN affine frozen)"),
    ("TrainSeedNet", "bn_mode"): ("batch_stats", f"{SAD} §3.2 (batch statistics in training)"),
    ("TrainSeedNet", "iterations"): (4634, f"{SAD} §3.5 (7 epochs x 662)"),
    ("TrainSeedNet", "batch_size"): (16, f"{SAD} §3.5"),
    ("TrainSeedNet", "crop_size"): (321, f"{SAD} §3.5"),
    ("TrainSeedNet", "lr"): (5e-4, f"{SAD} §3.5"),
    ("TrainSeedNet", "momentum"): (0.9, f"{SAD} §3.5 (explicit, no quirk)"),
    ("TrainSeedNet", "weight_decay"): (5e-4, f"{SAD} §3.5"),
    ("TrainSeedNet", "warmup_iterations"): (200, f"{SAD} §3.5"),
    ("TrainSeedNet", "step_gamma"): (0.3, f"{SAD} §3.5"),
    ("TrainSeedNet", "step_epochs"): (3, f"{SAD} §3.5"),
    ("TrainSeedNet", "predict_scales"): ((0.75, 1.0, 1.25), f"{SAD} §3.5"),
    ("TrainSeedNet", "dgcn_k"): (10, f"{SAD} §6.1 item 10"),
    ("TrainSeedNet", "dgcn_seed_capacity"): (10.0, f"{SAD} §6.1 item 11"),
    ("TrainSeedNet", "dgcn_update_threshold"): (0.7, f"{SAD} §6.1 item 11"),
    ("RefineCRF", "preset"): ("method", f"{SAD} §3.5 (test CRF 3/3, 80/13/10: the record's dgcn_test)"),
}
DSRG = {
    ("Propagate", "propagation"): ("dsrg", f"{SAD} §3.8"),
    ("TrainSeedNet", "method"): ("dsrg", f"{SAD} §3.8"),
    ("TrainSeedNet", "iterations"): (8000, f"{SAD} §3.8"),
    ("TrainSeedNet", "batch_size"): (20, f"{SAD} §3.8"),
    ("TrainSeedNet", "lr"): (5e-4, f"{SAD} §3.8"),
    ("TrainSeedNet", "step_gamma"): (0.33, f"{SAD} §3.8"),
    ("TrainSeedNet", "step_iterations"): (1000, f"{SAD} §3.8"),
    ("TrainSeedNet", "warmup_iterations"): (0, f"{SAD} §3.8"),
    ("TrainSeedNet", "dsrg_bg_threshold"): (0.99, f"{SAD} §3.8"),
    ("TrainSeedNet", "dsrg_fg_threshold"): (0.85, f"{SAD} §3.8"),
    ("TrainSeedNet", "head_bias_20x"): (True, f"{SAD} §3.8 (caffe solver)"),
}
GMN = "gmnet_ddd_spec.md"
GMNET = {
    ("TrainPartSegmentation", "cond_source"): ("supervised", f"{GMN} A.1 (object DeepLab-v3+ softmax)"),
    ("TrainPartSegmentation", "part_space"): ("pascal_part_58", f"{GMN} A.1; gmnet_ddd_deeplab_crf.md §1.1"),
    ("TrainPartSegmentation", "backbone"): ("resnet101", f"{GMN} A.2 (resnet_v1_101_beta)"),
    ("TrainPartSegmentation", "freeze_bn"): (True, f"{GMN} A.4"),
    ("TrainPartSegmentation", "gm_lambda"): (0.1, f"{GMN} A.3"),
    ("TrainPartSegmentation", "gm_dilation"): (2, f"{GMN} A.3"),
    ("TrainPartSegmentation", "aux_lambda"): (1e-4, f"{GMN} A.3"),
    ("TrainPartSegmentation", "iterations"): (50000, f"{GMN} A.4"),
    ("TrainPartSegmentation", "batch_size"): (10, f"{GMN} A.4"),
    ("TrainPartSegmentation", "lr"): (0.005, f"{GMN} A.4"),
    ("TrainPartSegmentation", "lr_decay_every"): (1, f"{GMN} A.4"),
    ("TrainPartSegmentation", "momentum"): (0.9, f"{GMN} A.4"),
    ("TrainPartSegmentation", "weight_decay"): (1e-4, f"{GMN} A.4"),
    ("TrainPartSegmentation", "head_lr_mult"): (1.0, f"{GMN} A.4 (no 10x head)"),
    ("TrainPartSegmentation", "bias_lr_mult"): (2.0, f"{GMN} A.4"),
    ("TrainPartSegmentation", "crop_size"): (513, f"{GMN} A.4"),
    ("TrainPartSegmentation", "scales"): ((0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0), f"{GMN} A.4"),
    ("MakeObjectMaps", "scales"): ((1.0,), "gmnet_ddd_deeplab_crf.md §1.2 (vis_classes.py)"),
    ("EvalParts", "flip"): (False, f"{GMN} A.5 (single scale)"),
}
REFERENCE = {
    "voc.cfg": IRN,
    "voc_part58.cfg": GMNET,
    "voc_psa.cfg": PSA,
    "voc_seam.cfg": SEAM,
    "voc_wsgcn.cfg": {**{k: v for k, v in IRN.items() if k[0] != "Propagate"}, **WSGCN},
    "voc_a2gnn.cfg": A2GNN,
    "voc_a2gnn_point.cfg": {**A2GNN, ("ExtractSeeds", "supervision"): ("point", f"{SAD} §2.3")},
    "voc_a2gnn_scribble.cfg": {**A2GNN, ("ExtractSeeds", "supervision"): ("scribble", f"{SAD} §2.3"),
                               ("TrainAffinity", "window_radius"): (4, f"{SAD} §2.4 (box, scribble)")},
    "voc_a2gnn_box.cfg": {**A2GNN, ("ExtractSeeds", "supervision"): ("box", f"{SAD} §2.3"),
                          ("TrainAffinity", "window_radius"): (4, f"{SAD} §2.4 (box, scribble)")},
    "voc_dgcn.cfg": DGCN,
    "voc_dsrg.cfg": DSRG,
}
# The references whose optimiser passes weight decay into SGD's momentum slot, per trained stage.
QUIRK = {"voc.cfg": ("TrainCAM", "TrainAffinity"), "voc_psa.cfg": ("TrainCAM", "TrainAffinity"),
         "voc_seam.cfg": ("TrainCAM", "TrainAffinity"), "voc_a2gnn.cfg": ("TrainCAM", "TrainAffinity")}


def values_of(preset: str) -> dict[str, dict[str, object]]:
    return recipe_values(REPO / "configs" / preset, STAGE_CONFIGS)


@pytest.mark.parametrize("preset", sorted(REFERENCE))
def test_every_voc_recipe_preset_runs_its_reference_values(preset):
    values = values_of(preset)
    wrong = [f"[{section}] {knob} = {values[section][knob]!r}, reference {expected!r} ({source})"
             for (section, knob), (expected, source) in REFERENCE[preset].items()
             if values[section][knob] != pytest.approx(expected) and values[section][knob] != expected]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("preset", sorted(QUIRK))
def test_the_momentum_quirk_is_on_where_the_reference_has_it(preset):
    values = values_of(preset)
    for stage in QUIRK[preset]:
        assert values[stage]["momentum_quirk"] is True, (preset, stage)


def test_every_method_has_a_voc_and_a_demo_recipe():
    for family in ("psa", "wsgcn", "a2gnn", "a2gnn_point", "a2gnn_scribble", "a2gnn_box", "dgcn", "dsrg"):
        for profile in ("voc", "demo"):
            values = values_of(f"{profile}_{family}.cfg")
            assert values["PrepareDataset"]["kind"] == ("voc" if profile == "voc" else "synthetic"), family


def test_the_demo_chain_is_wsgcns_recipe_and_irns_walk_keeps_a_demo_recipe():
    """configs/demo.cfg runs WSGCN on IRN's CAMs and IRNet (the same values as demo_wsgcn.cfg); IRN's own walk,
    its main chain before, is demo_irn.cfg, the demo counterpart of voc.cfg."""
    main, wsgcn, irn = values_of("demo.cfg"), values_of("demo_wsgcn.cfg"), values_of("demo_irn.cfg")
    assert main == wsgcn
    assert (main["Propagate"]["propagation"], main["RefineCRF"]["preset"]) == ("gcn", "method")
    assert (irn["Propagate"]["propagation"], irn["RefineCRF"]["preset"]) == ("rw_irn", "a2gnn_final")
    assert values_of("voc.cfg")["Propagate"]["propagation"] == irn["Propagate"]["propagation"]
    assert {s: v for s, v in irn.items() if s not in ("Propagate", "RefineCRF")} == \
        {s: v for s, v in main.items() if s not in ("Propagate", "RefineCRF")}


@pytest.mark.parametrize("preset, propagation", [("demo_psa.cfg", "rw_psa"), ("demo_irn.cfg", "rw_irn"),
                                                 ("demo_a2gnn.cfg", "a2gnn"), ("demo_dgcn.cfg", "graphcut"),
                                                 ("demo_dsrg.cfg", "dsrg")])
def test_a_recipe_entry_compares_the_method_with_its_own_recipe_from_the_main_chains_cams(preset, propagation):
    entry = comparison(preset)
    assert entry.recipe == f"configs/{preset}"
    assert entry.overrides["Propagate"]["propagation"] == propagation
    # Only the stages after the CAMs: the comparison keeps the main chain's CAM net and CAMs.
    assert not {"PrepareDataset", "PretrainBackbone", "TrainCAM", "MakeCAM", "EvalCAM"} & set(entry.overrides)


def test_the_main_chains_own_recipe_compares_as_the_main_chain():
    assert comparison("demo_wsgcn.cfg").overrides == {}


def test_a_method_on_the_main_chains_seeds_has_an_explicit_name():
    assert comparison(f"gcn{MAIN_CHAIN}").overrides == {"Propagate": {"propagation": "gcn"},
                                                       "TrainAffinity": {"affinity_method": "irnet"}}
    with pytest.raises(ValueError, match="gcn@main"):
        comparison("gcn")
    with pytest.raises(ValueError, match="no such preset"):
        comparison("no_such_recipe.cfg")

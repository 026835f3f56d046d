"""Build and load the CAM network of ``TrainCAM.cam_method`` (registry: :data:`stages.cam.CAM_METHODS`).

A method's builder returns a network with ``training_loss``, ``param_groups`` and ``cam``; its
``cam_normalization`` attribute tells the inference how to normalise the summed multi-scale maps.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from data.artifacts import MODEL_WEIGHTS
from stages.cam import CAM_METHODS
from stages.config import TrainCAMConfig


def build_cam_model(cfg: TrainCAMConfig, num_classes: int, pretrained: bool = True) -> nn.Module:
    return CAM_METHODS.get(cfg.cam_method, key="TrainCAM.cam_method")(cfg, num_classes, pretrained=pretrained)




def load_cam_model(cfg: TrainCAMConfig, num_classes: int, directory: str | os.PathLike,
                   device: torch.device) -> torch.nn.Module:
    model = build_cam_model(cfg, num_classes, pretrained=False)
    path = Path(directory) / MODEL_WEIGHTS
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.to(device).eval()

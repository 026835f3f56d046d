"""What a propagation method is: a self-describing record, one per method module (its ``METHOD``).

Everything the pipeline needs to know about a method lives in its record, so the step, the Luigi stage and the
comparison (``Report.compare``) read it instead of keeping side tables: which trained net it reads, which inputs,
whether it batches, its validation and the final CRF of its paper. A method's own ``Propagate`` knobs carry its
name as a prefix (``gcn_*``); only the chosen method's enter the stage's key.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from stages.config import PropagateConfig

# fn(cfg, cams {"cam", "high_res"}, inputs, image size, device) -> (class scores (K+1, H, W), argmax index (H, W))
RunFn = Callable[[PropagateConfig, dict, dict, tuple[int, int], torch.device], tuple[np.ndarray, np.ndarray]]
# fn(cfg, [(cams, inputs, size), ...], device) -> [(scores, index), ...], equal to RunFn image by image
RunBatchFn = Callable[[PropagateConfig, Sequence[tuple[dict, dict, tuple[int, int]]], torch.device],
                      list[tuple[np.ndarray, np.ndarray]]]

AFFINITY_NET = "affinity"   # TrainAffinity, with the record's affinity_method
SEED_NET = "seed_net"       # TrainSeedNet, with method = the record's name


@dataclass(frozen=True)
class MethodInputs:
    """What a method reads besides the CAMs; the step computes exactly these for each image.

    From the trained net: IRNet's ``boundary``, AffinityNet's ``features``, A2GNN's window graph, or a seed net's
    ``probs``, whichever that net gives (stages.affinity.train.infer_affinity_input). The flags add the rest.
    """

    boundary_features: bool = False   # IRNet's weighted boundary features (WSGCN's node features)
    image: bool = False               # rgb, image_id, num_labels, seeds, keys, supervision and boxes


@dataclass(frozen=True)
class PropagationMethod:
    """One propagation method: its function and everything the pipeline needs to run and compare it."""

    name: str
    run: RunFn
    trained_by: str                         # AFFINITY_NET | SEED_NET
    reference: str                          # the paper and code it follows
    affinity_method: str = ""               # trained_by = affinity: the TrainAffinity.affinity_method it reads
    inputs: MethodInputs = field(default_factory=MethodInputs)
    run_batch: RunBatchFn | None = None     # several images at once (same results as run), for GPUs
    batch_knob: str = ""                    # the PropagateConfig knob giving that batch's size
    validate: Callable[[PropagateConfig], None] | None = None
    final_crf: str = ""                     # the CRF preset (stages.refine.crf) its paper ends with, if any
    # Report.compare: TrainAffinity overrides per seed supervision (A2GNN's wider window for box/scribble seeds)
    affinity_overrides: Mapping[str, Mapping[str, object]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.trained_by not in (AFFINITY_NET, SEED_NET):
            raise ValueError(f"propagation method {self.name}: trained_by must be {AFFINITY_NET} or {SEED_NET}")
        if (self.trained_by == AFFINITY_NET) != bool(self.affinity_method):
            raise ValueError(f"propagation method {self.name}: affinity_method is needed exactly when "
                             f"trained_by = {AFFINITY_NET}")
        if bool(self.run_batch) != bool(self.batch_knob):
            raise ValueError(f"propagation method {self.name}: run_batch and batch_knob go together")

    def batch_size(self, cfg: PropagateConfig) -> int:
        return int(getattr(cfg, self.batch_knob)) if self.run_batch else 1

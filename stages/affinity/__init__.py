"""The affinity step (``TrainAffinity``): an inter-pixel relation net trained on the seeds.

``AFFINITY_METHODS`` maps ``TrainAffinity.affinity_method`` to the function that builds its net. IRNet and PSA's
AffinityNet share the pair losses and the training loop of :mod:`stages.affinity.train`; A2GNN's window net lives
in :mod:`stages.affinity.a2gnn`, imported only when it is chosen.
"""

from models.registry import LazyRegistry

AFFINITY_METHODS = LazyRegistry("affinity method", {
    "irnet": "stages.affinity.train:build_irnet",
    "affinitynet": "stages.affinity.train:build_affinitynet",
    "a2gnn": "stages.affinity.a2gnn:build",
})

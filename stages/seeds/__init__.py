"""The seeds step (``ExtractSeeds``): confident seeds from the CAMs, plus any extra supervision.

The seed rules (IRN, PSA, A2GNN) live in :mod:`stages.seeds.rules`. Points, scribbles and boxes are merged on top
by :mod:`stages.seeds.supervision`, named in ``SUPERVISION_MODULES`` and imported only when
``ExtractSeeds.supervision`` is not ``image``: with image labels that code is neither run nor part of the key.
"""

from models.registry import LazyRegistry

SUPERVISION_MODULES = LazyRegistry("supervision", {
    "point": "stages.seeds.supervision",
    "scribble": "stages.seeds.supervision",
    "box": "stages.seeds.supervision",
})

"""wsss pipeline: Luigi tasks over the ``stages`` library. ``luigi --module pipeline FullWSSS``."""

from pipeline import presets  # noqa: F401,I001 - first: resolves the preset chain before any parameter is read
from pipeline.tasks import (  # noqa: F401 - re-exported for ``luigi --module pipeline``
    STAGES,
    EvalCAM,
    EvalPseudoLabels,
    ExtractSeeds,
    ExtractSeedsShard,
    FullWSSS,
    MakeCAM,
    MakeCAMShard,
    PrepareDataset,
    Propagate,
    PropagateShard,
    TrainAffinity,
    TrainCAM,
)

from pipeline import command_line  # noqa: F401 - --help's stage sections; records the run luigi schedules

__version__ = "0.1.0"

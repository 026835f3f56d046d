"""The CAM step: train the classification net (``TrainCAM``), infer multi-scale CAMs (``MakeCAM``), score them
(``EvalCAM``). ``CAM_METHODS`` names each method's builder; only the chosen one is imported (and hashed).
"""

from models.registry import LazyRegistry

CAM_METHODS = LazyRegistry("CAM method", {
    "cam": "stages.cam.irn:build",
    "psa": "stages.cam.psa:build",
    "seam": "stages.cam.seam:build",
})

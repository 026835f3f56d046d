"""The segmentation step: DeepLab trained on the pseudo labels or on GT (``TrainSegmentation``,
:mod:`stages.segmentation.train`) and evaluated on val (``EvalSegmentation``, :mod:`stages.segmentation.predict`).
Inference is its own module so that editing it reruns the evaluation, never the training."""

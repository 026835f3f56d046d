"""The segmentation step: DeepLab trained on the pseudo labels or on GT (``TrainSegmentation``,
:mod:`stages.segmentation.train`) and evaluated on val (``EvalSegmentation``, :mod:`stages.segmentation.predict`),
both on the segmenter of :mod:`stages.segmentation.model`. The evaluation's own code (test-time CRF, PNGs,
metrics) is its own module, so editing it reruns the evaluation, never the training."""

"""The dataset step (``PrepareDataset``): materialise the embedded dataset or check a VOC-layout one, and write the
manifest every later stage reads (:mod:`stages.dataset.prepare`)."""

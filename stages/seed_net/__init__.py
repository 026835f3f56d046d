"""The seed-net step (``TrainSeedNet``): a segmentation net trained from the seeds while they regrow every
iteration, by DGCN's graph cuts (:mod:`stages.seed_net.graphcut`) or DSRG's region growing
(:mod:`stages.seed_net.growing`); its predictions are the ``graphcut`` / ``dsrg`` pseudo labels."""

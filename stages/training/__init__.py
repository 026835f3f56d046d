"""What every trained stage shares: the training loop with resume (:mod:`stages.training.engine`), optimisers and
schedules (:mod:`stages.training.optim`), and the torchrun launch (:mod:`stages.training.distributed`)."""

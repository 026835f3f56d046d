"""The pretraining step (``PretrainBackbone``): our stand-in for ImageNet weights on a machine that has none,
a backbone trained to classify synthetic one-object renders (:mod:`stages.pretrain.train`)."""

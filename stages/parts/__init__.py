"""The part-segmentation step (GMNet): object maps for conditioning, a part segmenter trained with the
graph-matching loss, and its evaluation. Spec: ``shared/research/gmnet_ddd_spec.md`` part A."""

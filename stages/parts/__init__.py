"""The part-segmentation step (GMNet): object maps for conditioning, a part segmenter trained with the
graph-matching loss, and its evaluation. Spec: ``shared/research/gmnet_ddd_spec.md`` part A."""


def part_model(cond_source: str) -> str:
    """The segmenter a part run trains (``models.segmenters``): GMNet when conditioned, plain DeepLab-v3+ without."""
    return "deeplabv3plus" if cond_source == "none" else "gmnet"

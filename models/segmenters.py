"""The segmentation models a stage can name (``model = ...``), and :func:`create_segmenter` that builds one.

Why a table of module paths: a stage's cache key covers the modules it imports (``pipeline.hashing``). With every
model imported by one module, an edit to GMNet's conditioning net or to DDD's solver re-keyed every DeepLab
training; now a stage imports the chosen model's module only, and names it in its key (``module_of``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from models.registry import LazyRegistry

SEGMENTERS = LazyRegistry("segmentation model", {
    "deeplabv2": "models.deeplab:deeplabv2",
    "deeplabv3plus": "models.deeplab:deeplabv3plus",
    "deeplabv3": "models.deeplab:deeplabv3",
    "deeplabv3_ddd": "models.deeplab_ddd:deeplabv3_ddd",
    "gmnet": "models.gmnet:gmnet",
})


def create_segmenter(name: str, backbone: str, num_classes: int, pretrained: str | None = None,
                     freeze_bn: bool = True, msc: bool = False, rates: Sequence[int] | None = None,
                     bn_batch_stats: bool = False, output_stride: int = 0, ddd: object | None = None,
                     **options) -> nn.Module:
    """A registered segmenter. Only what differs from the model's own choice is passed on, so each factory takes the
    options that apply to it: ``rates`` (None = the model's dilation rates) and ``bn_batch_stats`` (DeepLab-v2/v3+),
    ``output_stride`` (0 = the model's own), ``ddd`` (``deeplabv3_ddd``: a ``models.ddd.DDDOptions``, the CRF's
    knobs), and ``options`` (``gmnet``: num_objects, cond_mult, cond_stride)."""
    extra = dict(options)
    if rates is not None:
        extra["rates"] = tuple(rates)
    if bn_batch_stats:
        extra["bn_batch_stats"] = True
    if output_stride:
        extra["output_stride"] = output_stride
    if ddd is not None:
        extra["ddd"] = ddd
    return SEGMENTERS.get(name)(backbone, num_classes, pretrained=pretrained, freeze_bn=freeze_bn, msc=msc, **extra)

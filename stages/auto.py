"""Knobs fitted to the data: the ``auto`` values of scale-dependent knobs, derived from the dataset.

A knob listed in :data:`stages.config.AUTO_KNOBS` takes ``auto`` (or ``auto:<reference value>``) in a preset;
the stage resolves it when it runs, from the training images' median size, by the knob's rule, and records
the value and the rule in its provenance. The key holds ``auto`` itself: the dataset's content is already in
every key, so one dataset resolves one way, and an edit of this module changes the keys of the stages that
resolve here (it is part of their code).

Walk lengths (``Propagate.steps``, ``gcn_walk_steps``, ``a2gnn_rw_logt``). A random walk of t steps spreads
over an area that grows linearly with t (the mean squared distance of a diffusion is linear in the number of
steps), so the walk reaches the same fraction of the image on a grid of another size when t scales with the
grid's area: t = t_ref x A / A_ref, A the median grid area ceil(h/s) x ceil(w/s) of the training images at the
walk's stride s and A_ref that of the reference's data (VOC's median image, 500 x 375). The references' walk
lengths are powers of two (T^t by repeated squaring: IRN and PSA t = 2^8, A2GNN 2^6), so t is rounded to the
nearest power of two in log2, and never below 1 step. On the ``demo`` profile (144 x 112) this gives the
values its presets were tuned to by hand (16, 16 and 2^2; SEAM's 64 -> 4).

Training lengths (``TrainSegmentation.iterations`` for both DeepLabs, the ceiling included,
``TrainAffinity.num_epochs``, ``TrainSeedNet.iterations``). A net learns from the pixels it is shown, so the
length is kept in passes over the training pixels: P = steps x batch x (pixels of the image one crop shows) /
(images x pixels per image). On larger images a fixed crop shows less of each image and a fixed step count fewer
passes; on fewer images a fixed epoch count gives fewer steps. ``auto`` uses the reference's P on VOC
(deeplab-pytorch 10.4, IRN 3, DGCN 3.85); ``auto:<P>`` one's own (the demo presets keep the passes they were
tuned to: on the demo's images they give the same 1,500 iterations and 15 epochs as before). Iterations are
rounded to tens, epochs to integers.

Crops (``crop_size`` of the same three nets). The crop is the square whose area is a share of the median
training image (deeplab-pytorch's, DGCN's and DSRG's 321 are 0.55 of VOC's 500 x 375, IRN's 512 the whole image),
rounded to 8 and at most the image's longer side, so that a crop shows as much of an image on any data. A
section's rules run in the table's order: the crop first, then the training length that counts its pixels.

Resize ranges (``TrainCAM.resize_long``). The CAM net is trained on images whose longer side is drawn from a
range, then cropped; at inference MakeCAM rescales the images as they are (its scales are shares of each image).
A range fixed in pixels trains the net on objects of another scale than it meets at inference when the images
are of another size (the demo's (80, 160) on images of 288 px is half the scale of the 1.0 inference scale). So
the range is kept in shares of the median image's longer side: IRN's (320, 640) of VOC's 500 is (0.64, 1.28);
``auto:<low>,<high>`` one's own shares. The CAM's crop follows the crop rule below.

A value fixed by hand at least :data:`WARN_FACTOR` times off what ``auto`` would choose for this data from each
of the rule's references (``steps``: IRN's and PSA's 256 and SEAM's 64) is a preset sized for other data:
:func:`fit_knobs` returns a warning naming the knob, the stage logs it, and the report lists it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from stages.config import AUTO_KNOBS, STAGE_CONFIGS, AutoRule, auto_reference, is_auto

REFERENCE_IMAGE = (375, 500)       # (height, width) of VOC 2012's median train_aug image
WARN_FACTOR = 4.0                  # a hand-set value this many times off auto's choice (crops: in area) warns


@dataclass(frozen=True)
class DatasetScale:
    """What the ``auto`` rules read of a dataset: the median training image size and the image count."""

    height: int
    width: int
    images: int

    def grid_area(self, stride: int) -> int:
        return math.ceil(self.height / stride) * math.ceil(self.width / stride)


@functools.lru_cache(maxsize=8)
def _median_size(paths: tuple[Path, ...]) -> tuple[int, int]:
    sizes = []
    for path in paths:
        try:
            with Image.open(path) as image:      # reads the header only
                width, height = image.size
        except OSError as err:
            raise ValueError(f"{path}: cannot read the image's size ({err})") from None
        sizes.append((height, width))
    if not sizes:
        raise ValueError("no training images to measure the dataset's scale on")
    heights, widths = sorted(h for h, _ in sizes), sorted(w for _, w in sizes)
    middle = len(sizes) // 2
    return heights[middle], widths[middle]


def dataset_scale(manifest) -> DatasetScale:
    """The median height and width (each on its own) of ``manifest``'s training images, and their count."""
    ids = manifest.splits["train"]
    height, width = _median_size(tuple(manifest.layout.image_path(i) for i in ids))
    return DatasetScale(height, width, len(ids))


def reference_scale() -> DatasetScale:
    return DatasetScale(*REFERENCE_IMAGE, images=10582)


def walk_length(rule: AutoRule, reference: float, scale: DatasetScale) -> tuple[int, str]:
    """The rule's value for ``scale`` from ``reference`` and the arithmetic that gave it, in words."""
    area, reference_area = scale.grid_area(rule.stride), reference_scale().grid_area(rule.stride)
    steps = _steps(rule, reference) * area / reference_area
    log2 = max(0, round(math.log2(max(steps, 1.0))))
    value = log2 if rule.log2 else 2 ** log2
    shown = f"2^{reference:g}" if rule.log2 else f"{reference:g}"
    return value, (f"{shown} steps x grid area {area} / {reference_area} (stride {rule.stride}; median image "
                   f"{scale.height}x{scale.width}, VOC's {REFERENCE_IMAGE[0]}x{REFERENCE_IMAGE[1]}) = {steps:.3g}, "
                   f"nearest power of two 2^{log2}")


def _steps(rule: AutoRule, value) -> float:
    """What a value amounts to, for comparing values: steps of a walk, a training length, a crop's area, the area
    a resize range's geometric mean gives the image."""
    if rule.kind == "crop":
        return value * value
    if rule.kind == "resize":
        return value[0] * value[1]
    return 2 ** value if rule.log2 else value


def crop_side(rule: AutoRule, share: float, scale: DatasetScale) -> tuple[int, str]:
    """The crop side whose square is ``share`` of the median image's pixels, rounded to ``round_to``, at most the
    image's longer side."""
    image = scale.height * scale.width
    exact = math.sqrt(share * image)
    side = min(max(rule.round_to, rule.round_to * round(exact / rule.round_to)), max(scale.height, scale.width))
    return side, (f"a square of {share:g} x the median image's {scale.height}x{scale.width} = {image} px: "
                  f"side {exact:.4g}, rounded to {side}")


def resize_range(shares: tuple[float, float], scale: DatasetScale) -> tuple[tuple[int, int], str]:
    """The (low, high) longer side that is ``shares`` of the median image's longer side."""
    longer = max(scale.height, scale.width)
    low, high = (max(1, round(share * longer)) for share in shares)
    return (low, high), (f"({shares[0]:g}, {shares[1]:g}) x the median image's longer side {longer} "
                         f"({scale.height}x{scale.width}) = ({low}, {high})")


def _pixels_per_sample(cfg, scale: DatasetScale) -> int:
    """Image pixels one training sample shows: the crop, or the whole image where the crop is larger."""
    crop = cfg.crop_size
    return min(crop, scale.height) * min(crop, scale.width)


def training_length(rule: AutoRule, passes: float, cfg, scale: DatasetScale) -> tuple[int, str]:
    """The iterations (or epochs) that make ``passes`` passes over the training pixels, and why, in words."""
    image, sample = scale.height * scale.width, _pixels_per_sample(cfg, scale)
    where = (f"median image {scale.height}x{scale.width}, crop {cfg.crop_size}: {sample} of its {image} px per "
             f"sample")
    if rule.unit == "epochs":
        exact = passes * image / sample
        value = max(1, round(exact))
        return value, f"{passes:g} passes over the training pixels ({where}) = {exact:.3g} epochs, rounded to {value}"
    per_step = cfg.batch_size * getattr(cfg, "accumulation", 1) * sample
    exact = passes * scale.images * image / per_step
    value = max(rule.round_to, rule.round_to * round(exact / rule.round_to))
    return value, (f"{passes:g} passes over the training pixels ({scale.images} images, {where}; "
                   f"{per_step} px per step) = {exact:.4g} iterations, rounded to {value}")


def fitted_value(rule: AutoRule, reference: float, cfg, scale: DatasetScale) -> tuple[int, str]:
    if rule.kind == "passes":
        return training_length(rule, reference, cfg, scale)
    if rule.kind == "crop":
        return crop_side(rule, reference, scale)
    if rule.kind == "resize":
        return resize_range(reference, scale)
    return walk_length(rule, reference, scale)


def fit_knobs(cfg, scale: DatasetScale) -> tuple[object, dict, list[str]]:
    """``cfg`` with its ``auto`` knobs resolved for ``scale``; the record of each (value, rule) and the warnings
    for hand-set values far from auto's choice. A knob this configuration does not read (another method's walk)
    is left as it is and draws no warning."""
    section = next(name for name, cls in STAGE_CONFIGS.items() if isinstance(cfg, cls))
    record, warnings = {}, []
    # in the table's order, each rule seeing the values resolved before it (a training length, the crop)
    for knob, rule in AUTO_KNOBS.get(section, {}).items():
        if not rule.is_read(cfg):
            continue
        value = getattr(cfg, knob)
        if is_auto(value):
            chosen, why = fitted_value(rule, auto_reference(rule, value), cfg, scale)
            cfg = dataclasses.replace(cfg, **{knob: chosen})
            record[knob] = {"value": chosen, "set": str(value), "rule": why}
        elif warning := far_from_auto(section, knob, rule, value, cfg, scale):
            warnings.append(warning)
    return cfg, record, warnings


def far_from_auto(section: str, knob: str, rule: AutoRule, value: float, cfg, scale: DatasetScale) -> str | None:
    """A warning when hand-set ``value`` is at least WARN_FACTOR times off what ``auto`` chooses from every
    reference of the rule (a value one paper uses at this scale, SEAM's t = 64 as IRN's 256, is not flagged)."""
    choices = [fitted_value(rule, reference, cfg, scale) for reference in rule.references]
    factors = [_steps(rule, value) / _steps(rule, chosen) for chosen, _ in choices]
    nearest = min(range(len(choices)), key=lambda i: abs(math.log(factors[i])))
    factor = factors[nearest]
    if max(factor, 1 / factor) < WARN_FACTOR:
        return None
    chosen, why = choices[nearest]
    shown = f"[{value[0]}, {value[1]}]" if isinstance(value, tuple) else f"{value:g}"
    return (f"{section}.{knob} = {shown} is {max(factor, 1 / factor):.0f}x {'above' if factor > 1 else 'below'} "
            f"what `auto` chooses for this data ({chosen}: {why}); the preset may be sized for other data")

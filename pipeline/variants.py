"""A compared method (``Report.compare``), ``propagation[/supervision]``, as per-stage parameter overrides, read
from the method's record: the propagation, the net that trains it, and the seeds' supervision; and a compared
segmenter (``Report.compare_segmenters``), ``model[:knob=value,...]``, as TrainSegmentation overrides."""

from __future__ import annotations

import dataclasses

from stages.config import SUPERVISIONS, TrainSegmentationConfig


def segmenter_overrides(spec: str) -> dict[str, object]:
    """``{parameter: value}`` of TrainSegmentation for a ``Report.compare_segmenters`` entry, e.g.
    ``deeplabv3_ddd:output_stride=8,ddd_iterations=5`` (values typed as the knob's default)."""
    from models.deeplab import SEGMENTERS

    model, _, knobs = spec.partition(":")
    SEGMENTERS.get(model, key=f"Report.compare_segmenters entry {spec!r}")
    defaults = {f.name: f.default for f in dataclasses.fields(TrainSegmentationConfig)}
    overrides: dict[str, object] = {"model": model}
    for item in filter(None, knobs.split(",")):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in defaults or isinstance(defaults[name], tuple) or name == "model":
            raise ValueError(f"Report.compare_segmenters entry {spec!r}: {item!r} is not knob=value of a scalar "
                             "TrainSegmentation knob")
        kind = type(defaults[name])
        try:
            overrides[name] = value.strip().lower() in ("1", "true") if kind is bool else kind(value.strip())
        except ValueError:
            raise ValueError(f"Report.compare_segmenters entry {spec!r}: {name} = {value!r} is not a "
                             f"valid {kind.__name__}") from None
    return overrides


def variant_overrides(spec: str) -> dict[str, dict[str, object]]:
    """``{task family: {parameter: value}}`` that turn the main chain into the chain of method ``spec``."""
    from stages.propagation import PROPAGATION_METHODS
    from stages.propagation.method import AFFINITY_NET

    name, _, supervision = spec.partition("/")
    if name not in PROPAGATION_METHODS:
        raise ValueError(f"Report.compare entry {spec!r}: unknown propagation {name!r}; "
                         f"available: {', '.join(PROPAGATION_METHODS.names())}")
    method = PROPAGATION_METHODS.get(name)
    overrides: dict[str, dict[str, object]] = {"Propagate": {"propagation": name}}
    if method.trained_by == AFFINITY_NET:
        overrides["TrainAffinity"] = {"affinity_method": method.affinity_method}
    else:
        overrides["TrainSeedNet"] = {"method": name}
    if supervision:
        if supervision not in SUPERVISIONS:
            raise ValueError(f"Report.compare entry {spec!r}: supervision must be one of {', '.join(SUPERVISIONS)}")
        overrides["ExtractSeeds"] = {"supervision": supervision}
        overrides.get("TrainAffinity", {}).update(method.affinity_overrides.get(supervision, {}))
    return overrides

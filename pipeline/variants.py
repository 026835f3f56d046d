"""What ``Report.compare`` runs beside the main chain, from the same CAMs, as per-stage parameter overrides.

Two kinds of entry:

* a **recipe**: a preset file (``demo_dgcn.cfg``; a path, or a file of ``configs/``). The method runs as that
  preset runs it from the seeds on: its seed rule, its affinity or seed-net recipe, its walk, its final CRF and its
  DeepLab, i.e. every knob of :data:`RECIPE_FAMILIES` takes the value the preset (with its bases) gives it. The
  CAMs and the evaluation protocol stay the main chain's, so the rows compare.
* ``propagation[/supervision]@main``: the method on the main chain's seeds and recipes, with only what the
  method needs changed (its propagation, the net its record names, the seeds' supervision).

Overrides list only the knobs that differ from the main chain's, so stages both chains share keep one task and one
directory (pipeline.framework.stage_in_variant). A compared segmenter (``Report.compare_segmenters``),
``model[:knob=value,...]``, is a set of TrainSegmentation overrides (:func:`segmenter_overrides`).
"""

from __future__ import annotations

import configparser
import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from stages.config import STAGE_CONFIGS, SUPERVISIONS, TrainSegmentationConfig

# The stages a recipe entry takes from its preset: everything after the CAMs up to the retrained DeepLab.
RECIPE_FAMILIES = ("ExtractSeeds", "TrainAffinity", "TrainSeedNet", "Propagate", "RefineCRF", "TrainSegmentation")
MAIN_CHAIN = "@main"
RECIPE_SUFFIX = ".cfg"


def plain_value(value: object) -> object:
    """A parameter's value as stages take it: Luigi freezes tuples of lists, stages want plain tuples."""
    if isinstance(value, (tuple, list)):
        return tuple(plain_value(v) for v in value)
    return value


@dataclass(frozen=True)
class Comparison:
    """One ``Report.compare`` entry: its overrides ``{task family: {parameter: value}}`` and what it runs."""

    spec: str
    recipe: str          # the preset file it runs (as printed), or "" for a method on the main chain's seeds
    overrides: dict[str, dict[str, object]]


def comparison(spec: str) -> Comparison:
    """The comparison ``spec`` names, or a ValueError naming the entry."""
    if spec.endswith(RECIPE_SUFFIX):
        path = recipe_path(spec)
        from pipeline.presets import describe
        return Comparison(spec, describe(path), recipe_overrides(path))
    if spec.endswith(MAIN_CHAIN):
        return Comparison(spec, "", variant_overrides(spec.removesuffix(MAIN_CHAIN)))
    raise ValueError(f"Report.compare entry {spec!r}: name a recipe preset (e.g. demo_dgcn.cfg: the method with "
                     f"its own seeds, training and CRF) or '{spec}{MAIN_CHAIN}' (the method on the main chain's seeds)")


def recipe_path(spec: str) -> Path:
    """A recipe entry's file: the path as given (from the current directory), else ``configs/<its name>``."""
    from pipeline.presets import PRESETS_DIR
    for candidate in (Path(spec).expanduser(), PRESETS_DIR / Path(spec).name):
        if candidate.is_file():
            return candidate.resolve()
    raise ValueError(f"Report.compare entry {spec!r}: no such preset (looked for {spec} and {PRESETS_DIR / spec})")


def recipe_values(path: Path, families: Iterable[str] = RECIPE_FAMILIES) -> dict[str, dict[str, object]]:
    """Every knob of ``families`` as the preset ``path`` (with its bases) sets it, else its default."""
    import luigi

    from pipeline.presets import chain, read_file

    merged = configparser.ConfigParser(interpolation=None)
    merged.optionxform = str  # type: ignore[assignment,method-assign]
    for file in chain(path):
        merged.read_dict(read_file(file))
    values: dict[str, dict[str, object]] = {}
    for family in families:
        params = dict(luigi.task_register.Register.get_task_cls(family).get_params())
        values[family] = {}
        for knob in dataclasses.fields(STAGE_CONFIGS[family]):
            if merged.has_option(family, knob.name):
                try:
                    values[family][knob.name] = plain_value(params[knob.name].parse(merged.get(family, knob.name)))
                except ValueError as exc:
                    raise ValueError(f"{path}: [{family}] {knob.name}: {exc}") from exc
            else:
                values[family][knob.name] = knob.default
    return values


def differing_from_configured(family: str, values: dict[str, object]) -> dict[str, object]:
    """The entries of ``values`` that differ from stage ``family``'s configured knobs: overriding only those keeps
    every stage a variant shares with the configured chain one task and one directory."""
    import luigi

    configured = luigi.task_register.Register.get_task_cls(family)().config
    return {k: v for k, v in values.items() if getattr(configured, k) != v}


def recipe_overrides(path: Path) -> dict[str, dict[str, object]]:
    """The knobs where the recipe ``path`` differs from the main chain's configuration."""
    overrides: dict[str, dict[str, object]] = {}
    for family, values in recipe_values(path).items():
        differing = differing_from_configured(family, values)
        if differing:
            overrides[family] = differing
    return overrides


def segmenter_overrides(spec: str) -> dict[str, object]:
    """``{parameter: value}`` of TrainSegmentation for a ``Report.compare_segmenters`` entry, e.g.
    ``deeplabv3_ddd:output_stride=8,ddd_iterations=5`` (values typed as the knob's default)."""
    from models.segmenters import SEGMENTERS

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
    """``{task family: {parameter: value}}`` that turn the main chain into the chain of method ``spec``
    (``propagation[/supervision]``), read from the method's record."""
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


# ---------------------------------------------------------------------------------------------- part runs

PART_FAMILY = "TrainPartSegmentation"


@dataclass(frozen=True)
class PartRun:
    """One ``Report.parts_compare`` entry: GMNet trained with ``cond_source`` objects and ``gm_mode`` (and
    ``gm_lambda``, None = the configured value), as overrides of ``[TrainPartSegmentation]``."""

    spec: str
    cond_source: str
    gm_mode: str
    gm_lambda: float | None
    overrides: dict[str, dict[str, object]]


def part_run(spec: str) -> PartRun:
    """The part run ``spec`` (``source/gm_mode[/gm_lambda]``, e.g. ``gt/st``, ``supervised/st/10``) names, or a
    ValueError naming the entry. Its overrides list only what differs from the configured
    ``[TrainPartSegmentation]``, so an entry equal to it is the configured run (one task, one directory)."""
    from stages.config import CHOICES

    fields = spec.split("/")
    sources, modes = CHOICES[("TrainPartSegmentationConfig", "cond_source")], \
        CHOICES[("TrainPartSegmentationConfig", "gm_mode")]
    if len(fields) not in (2, 3) or fields[0] not in sources or fields[1] not in modes:
        raise ValueError(f"Report.parts_compare entry {spec!r}: write source/gm_mode[/gm_lambda] with source one of "
                         f"{', '.join(sources)} and gm_mode one of {', '.join(modes)} (e.g. 'gt/st', 'none/off/1')")
    gm_lambda = None
    if len(fields) == 3:
        try:
            gm_lambda = float(fields[2])
        except ValueError:
            raise ValueError(f"Report.parts_compare entry {spec!r}: gm_lambda {fields[2]!r} is not a number") \
                from None
        if not (gm_lambda >= 0 and gm_lambda != float("inf")):
            raise ValueError(f"Report.parts_compare entry {spec!r}: gm_lambda must be a finite number >= 0")
    wanted: dict[str, object] = {"cond_source": fields[0], "gm_mode": fields[1]}
    if gm_lambda is not None:
        wanted["gm_lambda"] = gm_lambda
    differing = differing_from_configured(PART_FAMILY, wanted)
    return PartRun(spec, fields[0], fields[1], gm_lambda, {PART_FAMILY: differing} if differing else {})

"""A compared method (``Report.compare``), ``propagation[/supervision]``, as per-stage parameter overrides, read
from the method's record: the propagation, the net that trains it, and the seeds' supervision."""

from __future__ import annotations

from stages.config import SUPERVISIONS


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

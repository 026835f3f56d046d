"""The propagation step (``Propagate``): pseudo labels from the CAMs, the seeds and a trained net.

One module per method, each with a ``METHOD`` record (:class:`stages.propagation.method.PropagationMethod`);
``PROPAGATION_METHODS`` names them. The step (:mod:`stages.propagation.propagate`) imports only the chosen
method's module, so a stage's cache key covers that method and not the others. Adding a method is one module
with a ``METHOD`` record plus one line here (README, "Adding a method").
"""

from models.registry import LazyRegistry

PROPAGATION_METHODS = LazyRegistry("propagation method", {
    "rw_irn": "stages.propagation.rw_irn:METHOD",
    "rw_psa": "stages.propagation.rw_psa:METHOD",
    "gcn": "stages.propagation.gcn:METHOD",
    "a2gnn": "stages.propagation.a2gnn:METHOD",
    "graphcut": "stages.propagation.graphcut:METHOD",
    "dsrg": "stages.propagation.dsrg:METHOD",
})

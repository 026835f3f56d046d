"""The refinement step (``RefineCRF``): a dense CRF on the propagated class scores (:mod:`stages.refine.refine`).
:mod:`stages.refine.crf` is every CRF of the pipeline (its presets name each reference call site), with the
permutohedral-lattice backend in :mod:`stages.refine.permutohedral`."""

"""The report step (``Report``): :mod:`stages.report.build` gathers every stage's results into
:mod:`stages.report.html`'s self-contained page and its Markdown summary."""

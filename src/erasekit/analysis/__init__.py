"""Analysis of an erasure's side effects: CLIP alignment, the sensitivity spectrum (AP paper sec. 3.2),
the concept graph (slides, "The Concept Graph") and model-difference inspection (slides eq. 19).

Plots and HTML fragments live in :mod:`erasekit.analysis.plots` and :mod:`erasekit.analysis.report_sections`
(they import matplotlib, so they are not imported here).
"""

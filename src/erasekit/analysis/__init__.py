"""Analysis of an erasure's side effects: CLIP alignment, the sensitivity spectrum (AP paper sec. 3.2),
the concept graph (slides, "The Concept Graph") and model-difference inspection (slides eq. 19).

Plots and HTML fragments live in :mod:`erasekit.analysis.plots` and :mod:`erasekit.analysis.report_sections`
(they import matplotlib, so they are not imported here).
"""

from erasekit.analysis.diff import DiffConfig, DiffResult, diff_images, edited_copy, inspect_difference, run_diff
from erasekit.analysis.graph import ConceptGraph, run_graph, text_distances
from erasekit.analysis.spectrum import (
    Spectrum,
    SpectrumConfig,
    concept_scores,
    edit_applied,
    run_spectra,
    sensitivity_spectrum,
    spectrum_for_edit,
)
from erasekit.eval.clip_score import ClipScorer, clip_score

__all__ = [
    "ClipScorer",
    "ConceptGraph",
    "DiffConfig",
    "DiffResult",
    "Spectrum",
    "SpectrumConfig",
    "clip_score",
    "concept_scores",
    "diff_images",
    "edit_applied",
    "edited_copy",
    "inspect_difference",
    "run_diff",
    "run_graph",
    "run_spectra",
    "sensitivity_spectrum",
    "spectrum_for_edit",
    "text_distances",
]

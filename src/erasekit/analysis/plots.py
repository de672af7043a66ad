"""Figures of the analysis, drawn with matplotlib's Agg canvas and returned as PNG bytes.

No pyplot and no global backend switch: each function builds a :class:`matplotlib.figure.Figure`
on a :class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`, so it is thread-safe and works
headless. PNGs carry no timestamp or version metadata (the same data gives the same bytes).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def to_png(fig: Figure, dpi: int = 110) -> bytes:
    """Render ``fig`` to PNG bytes (Agg), without metadata."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def as_spectra(spectra: Any) -> dict[str, Any]:
    """A spectrum or a mapping/sequence of spectra as ``{label: spectrum}``."""
    if hasattr(spectra, "delta"):
        return {spectra.label or "spectrum": spectra}
    if isinstance(spectra, Mapping):
        out = dict(spectra)
    else:
        out = {}
        for i, s in enumerate(spectra):
            out[s.label or f"spectrum {i + 1}"] = s
    if not out:
        raise ValueError("No spectra to plot.")
    return out


def _label(c: str) -> str:
    return repr(c) if c.strip() == "" else c


def spectrum_bar_chart(
    spectra: Any,
    *,
    top: int = 20,
    concepts: Sequence[str] | None = None,
    title: str | None = None,
) -> bytes:
    """AP paper Fig. 1: bars of ``delta_{c_e}(c)`` with standard-error whiskers.

    One spectrum, or several (e.g. one per preservation strategy, Fig. 1b) drawn as grouped bars on
    the same concepts. Concepts are the ``top`` most hurt in the first spectrum (or ``concepts``, in
    the given order); erased concepts are hatched.
    """
    specs = as_spectra(spectra)
    first = next(iter(specs.values()))
    if concepts is None:
        names = [first.concepts[i] for i in first.order()[:top]]
    else:
        names = [c for c in concepts if c in first.concepts]
        if not names:
            raise ValueError("None of `concepts` were measured in the spectrum.")
    n, m = len(names), len(specs)
    width = 0.8 / m
    fig = Figure(figsize=(max(6.0, 0.45 * n * max(1, m) ** 0.5 + 2), 4.2))
    ax = fig.add_subplot()
    x = np.arange(n)
    for k, (label, s) in enumerate(specs.items()):
        idx = [s.concepts.index(c) for c in names]
        d, se = s.delta[idx], s.stderr[idx]
        bars = ax.bar(
            x + (k - (m - 1) / 2) * width, d, width, yerr=se, capsize=2, label=label, color=PALETTE[k % len(PALETTE)]
        )
        for b, c in zip(bars, names, strict=True):
            if c in s.erased:
                b.set_hatch("//")
                b.set_edgecolor("black")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, [_label(c) for c in names], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("δ(c) = CLIP(original) − CLIP(edited)")
    erased = ", ".join(first.erased) or "?"
    ax.set_title(title or f"Impact of erasing {erased} (k = {len(first.seeds)} seeds)", fontsize=10)
    if m > 1:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return to_png(fig)


def spectrum_histogram(
    spectra: Any,
    *,
    bins: int = 40,
    mark: Sequence[str] = (),
    title: str | None = None,
) -> bytes:
    """AP paper Fig. 2: distribution of ``delta_{c_e}(c)`` over a vocabulary; ``mark`` draws chosen
    concepts (e.g. the neutral ``""``, related words) as labelled vertical lines of the first spectrum."""
    specs = as_spectra(spectra)
    first = next(iter(specs.values()))
    allv = np.concatenate([s.delta for s in specs.values()])
    edges = np.histogram_bin_edges(allv, bins=bins)
    fig = Figure(figsize=(7, 3.8))
    ax = fig.add_subplot()
    for k, (label, s) in enumerate(specs.items()):
        ax.hist(
            s.delta,
            bins=edges,
            histtype="stepfilled" if len(specs) == 1 else "step",
            lw=1.5,
            alpha=0.8 if len(specs) == 1 else 1.0,
            color=PALETTE[k % len(PALETTE)],
            label=label,
        )
    ymax = ax.get_ylim()[1]
    for j, c in enumerate(c for c in mark if c in first.concepts):
        v = first.delta[first.concepts.index(c)]
        ax.axvline(v, color="black", ls="--", lw=0.8)
        ax.text(v, ymax * (0.95 - 0.08 * (j % 5)), " " + _label(c), fontsize=8, va="top")
    ax.set_xlabel("δ(c) = CLIP(original) − CLIP(edited)")
    ax.set_ylabel("concepts")
    ax.set_title(
        title or f"Sensitivity spectrum of {len(first.concepts)} concepts to erasing {', '.join(first.erased) or '?'}",
        fontsize=10,
    )
    if len(specs) > 1:
        ax.legend(fontsize=8)
    return to_png(fig)


def locality_scatter(
    delta: np.ndarray,
    similarity: np.ndarray,
    labels: Sequence[str],
    *,
    annotate: int = 10,
    title: str | None = None,
) -> bytes:
    """AP paper Fig. 7: impact ``delta(c)`` against the text-embedding similarity of ``c`` to ``c_e``;
    the ``annotate`` most hurt concepts are labelled."""
    delta, similarity = np.asarray(delta, float), np.asarray(similarity, float)
    if delta.shape != similarity.shape or len(labels) != len(delta):
        raise ValueError(
            f"`delta`, `similarity` and `labels` must have the same length; got {delta.shape}, {similarity.shape}, {len(labels)}."
        )
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.scatter(similarity, delta, s=14, alpha=0.7)
    for i in np.argsort(-delta)[:annotate]:
        ax.annotate(_label(labels[i]), (similarity[i], delta[i]), fontsize=7, xytext=(3, 2), textcoords="offset points")
    ax.set_xlabel("text-embedding similarity to the erased concept")
    ax.set_ylabel("δ(c)")
    ax.set_title(title or "Impact vs. similarity to the erased concept", fontsize=10)
    ax.grid(alpha=0.3)
    return to_png(fig)


def impact_heatmap(graph: Any, *, max_concepts: int = 60, title: str | None = None) -> bytes:
    """The concept graph's impact matrix ``Delta_{c_e}(c_i)`` (rows: erasures, columns: concepts) as a
    heatmap centred at zero (red: capability lost). With more than ``max_concepts`` columns the
    concepts with the largest mean impact are shown."""
    impact = np.asarray(graph.impact, float)
    cols = np.arange(impact.shape[1])
    if len(cols) > max_concepts:
        cols = np.sort(np.argsort(-np.abs(impact).mean(0), kind="stable")[:max_concepts])
    sub = impact[:, cols]
    e, c = sub.shape
    fig = Figure(figsize=(min(18, 2 + 0.32 * c), min(12, 1.5 + 0.35 * e)))
    ax = fig.add_subplot()
    lim = float(np.abs(sub).max()) or 1.0
    im = ax.imshow(sub, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -lim, lim), aspect="auto", interpolation="nearest")
    ax.set_xticks(range(c), [_label(graph.concepts[i]) for i in cols], rotation=70, ha="right", fontsize=7)
    ax.set_yticks(range(e), [_label(n) for n in graph.erasures], fontsize=8)
    ax.set_xlabel("concept c_i")
    ax.set_ylabel("erased c_e")
    if e * c <= 400:
        for r in range(e):
            for k in range(c):
                v = sub[r, k]
                ax.text(
                    k,
                    r,
                    f"{v:.1f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if abs(v) > 0.6 * lim else "black",
                )
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02, label=r"$\Delta = G_0 - G_{c_e}$")
    ax.set_title(title or "Concept graph: impact of erasing c_e on c_i", fontsize=10)
    return to_png(fig)


def diff_bar_chart(result: Any, *, top: int = 15, include_changed: bool = True, title: str | None = None) -> bytes:
    """Eq. 19's ranking as horizontal stacked bars: ``L1`` and ``lambda * L2`` of the top concepts."""
    entries = result.top(top, include_changed=include_changed)
    if not entries:
        raise ValueError("The diff result has no entries to plot.")
    lam = float(result.config.get("diff", {}).get("lam", 1.0))
    names = [_label(e.concept) + (" (c_e)" if e.is_changed else "") for e in entries][::-1]
    l1 = np.array([e.l1 or 0.0 for e in entries])[::-1]
    l2 = np.array([lam * e.l2 for e in entries])[::-1]
    fig = Figure(figsize=(6.5, 0.3 * len(entries) + 1.2))
    ax = fig.add_subplot()
    y = np.arange(len(entries))
    if any(e.l1 is not None for e in entries):
        ax.barh(y, l1, color=PALETTE[0], label="L1 = ‖ε′(c_e) − ε(c_t)‖²")
    ax.barh(y, l2, left=l1, color=PALETTE[1], label=f"λ·L2 = {lam:g}·‖ε′(c_t) − ε(c_t)‖²")
    ax.set_yticks(y, names, fontsize=8)
    ax.set_xlabel("eq. 19 objective (mean squared error per latent element)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title or "Concepts that changed most (slides eq. 19)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return to_png(fig)


def concept_timeline(
    steps: Sequence[int], concepts: Sequence[str], *, title: str | None = None, max_concepts: int = 25
) -> bytes:
    """A method trace: which concept (e.g. AP's adversarial ``c_a``) was chosen at each step (left) and
    how often (right). Only the ``max_concepts`` most frequent concepts get their own row."""
    steps = list(steps)
    concepts = [_label(c) for c in concepts]
    if len(steps) != len(concepts) or not steps:
        raise ValueError(
            f"`steps` and `concepts` must be non-empty and of equal length; got {len(steps)} and {len(concepts)}."
        )
    names, counts = np.unique(np.array(concepts, dtype=object), return_counts=True)
    order = np.argsort(-counts, kind="stable")
    kept = [str(names[i]) for i in order[:max_concepts]]
    other = len(names) > max_concepts
    rows = kept + (["(other)"] if other else [])
    pos = {c: i for i, c in enumerate(rows)}
    y = [pos.get(c, len(rows) - 1) for c in concepts]
    fig = Figure(figsize=(9, 0.25 * len(rows) + 1.6))
    ax, bx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]}, sharey=True)
    ax.scatter(steps, y, s=10, color=PALETTE[0])
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    cnt = [int(counts[order[i]]) for i in range(len(kept))] + (
        [int(counts[order[max_concepts:]].sum())] if other else []
    )
    bx.barh(range(len(rows)), cnt, color=PALETTE[1])
    bx.set_xlabel("times chosen")
    fig.suptitle(title or "Concept chosen per step", fontsize=10)
    return to_png(fig)


def image_rows(
    rows: Sequence[np.ndarray],
    *,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    cell: float = 0.9,
    title: str | None = None,
) -> bytes:
    """A labelled grid: one row per uint8 (N, H, W, 3) array (rows may differ in length), pixel-exact."""
    rows = [np.asarray(r) for r in rows]
    if not rows or any(r.ndim != 4 or r.shape[-1] != 3 for r in rows):
        raise ValueError("`rows` must be a non-empty list of uint8 (N, H, W, 3) arrays.")
    ncol = max(len(r) for r in rows)
    fig = Figure(figsize=(cell * ncol + (1.6 if row_labels else 0.2), cell * len(rows) + (0.5 if title else 0.2)))
    axes = np.atleast_2d(fig.subplots(len(rows), ncol, squeeze=False))
    for i, r in enumerate(rows):
        for j in range(ncol):
            a = axes[i, j]
            a.set_xticks([])
            a.set_yticks([])
            for sp in a.spines.values():
                sp.set_visible(False)
            if j < len(r):
                a.imshow(r[j], interpolation="nearest")
            if j == 0 and row_labels:
                a.set_ylabel(row_labels[i], rotation=0, ha="right", va="center", fontsize=8)
            if i == 0 and col_labels and j < len(col_labels):
                a.set_title(col_labels[j], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9, y=1.0 + 0.25 / len(rows))
    fig.subplots_adjust(wspace=0.05, hspace=0.08)
    return to_png(fig)


__all__ = [
    "as_spectra",
    "concept_timeline",
    "diff_bar_chart",
    "image_rows",
    "impact_heatmap",
    "locality_scatter",
    "spectrum_bar_chart",
    "spectrum_histogram",
    "to_png",
]

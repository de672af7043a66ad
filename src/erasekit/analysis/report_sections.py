"""Self-contained HTML fragments of the analysis, for :func:`erasekit.html.write_report`.

Each function returns an HTML string (no ``<h2>``: ``write_report`` adds the section heading) whose
figures are embedded as base64 PNG, so the page opens in a browser with no server and no files
beside it. Text is escaped; numbers are formatted here (the shared table helper would read values in
[0, 1] as percentages).
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from erasekit.analysis import plots
from erasekit.html import table

TRACE_KEYS = ("adversarial", "adversarial_concept", "c_a", "target", "concept", "concepts")
"""Record fields :func:`method_trace_section` looks for, in order, when ``key`` is not given."""


def png_img(png: bytes, alt: str, *, caption: str | None = None, width: int | None = None) -> str:
    """An ``<img>`` with the PNG embedded as a data URI, in a ``<figure>`` when ``caption`` is given."""
    w = f' style="max-width:100%;width:{width}px"' if width else ' style="max-width:100%"'
    img = f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="{html.escape(alt)}"{w}>'
    if caption is None:
        return img
    return f"<figure style='margin:.5rem 0'>{img}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _c(concept: str) -> str:
    """A concept as shown in tables (the empty prompt is visible)."""
    return repr(concept) if concept.strip() == "" else concept


def _f(v: float | None, nd: int = 2) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{v:.{nd}f}"


def _p(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


def spectrum_section(
    spectra: Any, *, top: int = 20, mark: Sequence[str] = ("", "a photo"), histogram: bool = True
) -> str:
    """The sensitivity spectrum (AP paper sec. 3.2): summary table, Fig. 1 bar chart, Fig. 2
    histogram and the ranked list of the most hurt concepts. ``spectra`` is one
    :class:`~erasekit.analysis.spectrum.Spectrum` or ``{label: Spectrum}`` (e.g. ESD vs AP)."""
    specs = plots.as_spectra(spectra)
    first = next(iter(specs.values()))
    parts = [
        _p(
            f"δ(c) = mean over k = {len(first.seeds)} fixed seeds of CLIP(original image of c, c) − CLIP(edited image of c, c), "
            f"over {len(first.concepts)} concepts. Larger δ: the erasure hurt the model's ability to draw c more. "
            "'Top mean' is the mean δ of the most hurt concepts that were not erased (the top of the spectrum)."
        )
    ]
    rows = []
    for label, s in specs.items():
        sm = s.summary(top=min(top, 10))
        rows.append(
            [
                label,
                ", ".join(s.erased) or "–",
                str(sm["n_concepts"]),
                _f(sm["mean_delta"]),
                _f(sm["median_delta"]),
                _f(sm["top_mean_delta"]),
                _f(sm["max_delta"]),
                "; ".join(f"{_c(c)}: {_f(v)}" for c, v in sm["erased_delta"].items()) or "–",
                ", ".join(_c(c) for c in sm["most_hurt"]),
            ]
        )
    parts.append(
        table(
            [
                "spectrum",
                "erased",
                "concepts",
                "mean δ",
                "median δ",
                f"top-{min(top, 10)} mean δ",
                "max δ",
                "δ of erased",
                "most hurt",
            ],
            rows,
        )
    )
    parts.append(
        png_img(
            plots.spectrum_bar_chart(specs, top=top),
            "spectrum bar chart",
            caption=f"The {top} concepts most hurt (AP paper Fig. 1).",
        )
    )
    if histogram and len(first.concepts) >= 5:
        parts.append(
            png_img(
                plots.spectrum_histogram(specs, mark=mark),
                "spectrum histogram",
                caption="Distribution of δ over all concepts (AP paper Fig. 2).",
            )
        )
    labels = list(specs)
    head = ["rank", "concept", *[f"δ {lab}" for lab in labels], "G₀ (original CLIP)"]
    body, classes = [], []
    for r in first.ranked(top):
        cells = [str(r["rank"]), _c(r["concept"])]
        for s in specs.values():
            i = s.concepts.index(r["concept"]) if r["concept"] in s.concepts else None
            cells.append(f"{_f(s.delta[i])} ± {_f(s.stderr[i])}" if i is not None else "–")
        cells.append(_f(r["g0"]))
        body.append(cells)
        classes.append("erased" if r["erased"] else "")
    parts.append(table(head, body, classes))
    return "".join(parts)


def graph_section(graph: Any, *, distance: np.ndarray | None = None, quantile: float = 0.25) -> str:
    """The concept graph (slides, "The Concept Graph"): heatmap of ``Delta_{c_e}(c_i)`` and its
    properties as numbers (locality if ``distance`` is given, asymmetry, abnormal concepts)."""
    props = graph.properties(distance, quantile)
    parts = [
        _p(
            f"Impact Δ_{{c_e}}(c_i) = G₀(c_i) − G_{{c_e}}(c_i) of erasing each of {len(graph.erasures)} concepts on "
            f"{len(graph.concepts)} concepts (G = mean CLIP score; positive = capability lost)."
        ),
        png_img(plots.impact_heatmap(graph), "impact heatmap", caption="Impact matrix (red: hurt, blue: helped)."),
    ]
    rows = []
    if "locality" in props:
        loc = props["locality"]
        rows.append(
            ["locality: Spearman(Δ, distance to c_e)", _f(loc["mean_spearman"]), "negative = closer concepts hurt more"]
        )
        rows.append(
            [
                "locality: share of pairs with d_i < d_j and Δ_i ≥ Δ_j",
                _f(loc["mean_pair_agreement"]),
                "0.5 = no relation, 1 = perfectly local",
            ]
        )
    asym = props["asymmetry"]
    rows.append(["asymmetry index over erased pairs", _f(asym["index"]), f"0 = symmetric; {asym['n_pairs']} pairs"])
    ab = props["abnormal"]
    rows.append(
        [
            "Spearman(G₀, mean impact)",
            _f(ab["spearman_g0_vs_impact"]),
            "negative = weakly drawn concepts are hurt by any erasure",
        ]
    )
    parts.append(table(["property", "value", "reading"], rows))
    if asym["pairs"]:
        parts.append(_p("Most asymmetric pairs:"))
        parts.append(
            table(
                ["a", "b", "Δ_a(b)", "Δ_b(a)"],
                [[_c(p["a"]), _c(p["b"]), _f(p["a_on_b"]), _f(p["b_on_a"])] for p in asym["pairs"][:10]],
            )
        )
    if ab["flagged"]:
        parts.append(_p(f"Abnormal concepts (bottom {quantile:.0%} of G₀ and top {quantile:.0%} of mean impact):"))
        parts.append(
            table(
                ["concept", "G₀", "mean impact"],
                [[_c(r["concept"]), _f(r["g0"]), _f(r["mean_impact"])] for r in ab["flagged"]],
            )
        )
    if "locality" in props:
        parts.append(
            table(
                ["erased", "Spearman(Δ, d)", "pair agreement"],
                [
                    [_c(r["erasure"]), _f(r["spearman"]), _f(r["pair_agreement"])]
                    for r in props["locality"]["per_erasure"]
                ],
            )
        )
    return "".join(parts)


def diff_section(result: Any, *, top: int = 10, images: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> str:
    """Model-difference inspection (slides eq. 19): the ranking, its two terms, and (if given, from
    :func:`~erasekit.analysis.diff.diff_images`) images of the top concepts from both models."""
    d = result.config.get("diff", {})
    changed = d.get("changed")
    parts = [
        _p(
            f"Concepts of a {len(result.entries)}-concept inspection space ranked by ‖ε′(c_e) − ε(c_t)‖² + λ‖ε′(c_t) − ε(c_t)‖² "
            f"with c_e = {_c(changed) if changed is not None else '(none: L2 only)'} and λ = {d.get('lam', '?')}, "
            f"averaged over {len(result.config.get('samples', []))} (z_t, t) samples."
        ),
        png_img(plots.diff_bar_chart(result, top=top), "eq. 19 ranking"),
    ]
    rows = [
        [
            str(i + 1),
            _c(e.concept) + (" (c_e)" if e.is_changed else ""),
            f"{e.objective:.4g}",
            "–" if e.l1 is None else f"{e.l1:.4g}",
            f"{e.l2:.4g}",
        ]
        for i, e in enumerate(result.top(top, include_changed=True))
    ]
    parts.append(table(["rank", "concept", "objective", "L1", "L2"], rows))
    if images:
        for c, pair in images.items():
            png = plots.image_rows([pair["original"], pair["edited"]], row_labels=["original", "edited"], title=_c(c))
            parts.append(png_img(png, f"images of {c}"))
    return "".join(parts)


def _read_log(log: str | Path | Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    if isinstance(log, str | Path):
        path = Path(log)
        if path.is_dir():
            path = path / "log.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"No trace log at {str(path)!r}; expected a JSONL file with one record per step.")
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return list(log)


def _runs(steps: Sequence[int], names: Sequence[str]) -> list[tuple[int, int, str]]:
    """Run-length encoding: consecutive steps with the same concept become one (first, last, concept)."""
    out: list[tuple[int, int, str]] = []
    for s, c in zip(steps, names, strict=True):
        if out and out[-1][2] == c:
            out[-1] = (out[-1][0], s, c)
        else:
            out.append((s, s, c))
    return out


def method_trace_section(
    *,
    log: str | Path | Sequence[Mapping[str, Any]] | None = None,
    key: str | None = None,
    epoch_images: Mapping[str, np.ndarray] | Sequence[np.ndarray] | None = None,
    max_rows: int = 40,
) -> str:
    """A method's own trace. ``log`` (records ``{step, <key>: concept or [concepts]}``, a JSONL path,
    or a run directory holding ``log.jsonl``): the concept chosen per step, e.g. AP's / AGE's
    adversarial concept, as a timeline and a run-length table. ``epoch_images``: one row of images
    per epoch (e.g. images generated from RECE's derived embeddings), labelled by the mapping's keys."""
    if log is None and epoch_images is None:
        raise ValueError("Give `log` (per-step records) and/or `epoch_images`.")
    parts: list[str] = []
    if log is not None:
        recs = _read_log(log)
        if key is None:
            key = next((k for k in TRACE_KEYS if any(k in r for r in recs)), None)
            if key is None:
                raise ValueError(f"No concept field in the log records; pass `key` (looked for {TRACE_KEYS}).")
        recs = [r for r in recs if key in r]
        if not recs:
            raise ValueError(f"No log record has the field {key!r}.")
        steps = [int(r.get("step", i)) for i, r in enumerate(recs)]
        names = [" + ".join(map(str, v)) if isinstance(v, list | tuple) else str(v) for v in (r[key] for r in recs)]
        parts.append(_p(f"The concept chosen at each of {len(recs)} logged steps (field {key!r})."))
        parts.append(png_img(plots.concept_timeline(steps, names), "concept per step"))
        runs = _runs(steps, names)
        shown = runs if len(runs) <= max_rows else runs[: max_rows // 2] + [(-1, -1, "…")] + runs[-max_rows // 2 :]
        rows = [["…", "", "…"] if a < 0 else [str(a), str(b), _c(c)] for a, b, c in shown]
        parts.append(table(["from step", "to step", "concept"], rows))
    if epoch_images is not None:
        items = (
            list(epoch_images.items())
            if isinstance(epoch_images, Mapping)
            else [(f"epoch {i + 1}", v) for i, v in enumerate(epoch_images)]
        )
        if not items:
            raise ValueError("`epoch_images` is empty.")
        png = plots.image_rows([np.asarray(v) for _, v in items], row_labels=[str(k) for k, _ in items])
        parts.append(png_img(png, "images per epoch", caption="One row per epoch."))
    return "".join(parts)


__all__ = ["diff_section", "graph_section", "method_trace_section", "png_img", "spectrum_section"]

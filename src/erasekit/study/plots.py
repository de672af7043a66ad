"""A study's figures (PNG, matplotlib's Agg canvas via :func:`erasekit.analysis.plots.to_png`):

- ``esr_psr.png``: each method's ESR-PSR trade-off on the selection images (one point per check of
  the operating-point rule; a line per cell, one colour per method), the target as a dashed line.
- ``asr.png``: ASR per attack, grouped bars per method, 95% interval whiskers (one panel per concept).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from erasekit.analysis.plots import PALETTE, to_png
from erasekit.io import atomic_path
from erasekit.study.spec import StudySpec
from erasekit.study.stats import mean_interval
from erasekit.study.tables import LABEL, curves, tidy


def esr_psr_curves(spec: StudySpec, study_dir: Path) -> bytes | None:
    """ESR-x vs PSR-x of every check (selection images); ``None`` when no cell has a curve."""
    data = curves(spec, study_dir)
    if not data:
        return None
    op = spec.operating_point
    metric = op.metric if op.rule == "target" else "esr_1"
    k = metric.split("_")[1]
    x_key, y_key = f"esr_{k}", f"psr_{k}"
    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.add_subplot()
    colour = {m.label: PALETTE[i % len(PALETTE)] for i, m in enumerate(spec.methods)}
    seen: set[str] = set()
    for recs in data.values():
        m = recs[0]["method"]
        xs = [100 * r[x_key] for r in recs]
        ys = [100 * r[y_key] for r in recs]
        ax.plot(xs, ys, "-o", color=colour[m], ms=3, lw=1, alpha=0.8, label=None if m in seen else m)
        seen.add(m)
    if op.rule == "target" and metric.startswith("esr"):
        ax.axvline(100 * op.target, ls="--", color="#555555", lw=1)
    ax.set_xlabel(f"{LABEL[x_key]} on selection images (%)")
    ax.set_ylabel(f"{LABEL[y_key]} on selection images (%)")
    ax.set_title(f"{spec.name}: ESR-PSR trade-off (one point per check)")
    ax.set_xlim(-2, 102)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return to_png(fig)


def asr_bars(spec: StudySpec, study_dir: Path) -> bytes | None:
    """ASR per attack and method (mean over seeds, 95% interval); ``None`` without attack results."""
    if spec.attacks is None:
        return None
    rows = tidy(spec, study_dir)
    concepts = [
        c.label for c in spec.concepts if any(r["concept"] == c.label and r["metric"].startswith("asr:") for r in rows)
    ]
    if not concepts:
        return None
    names = ["pre_attack", *[f"asr:{a}" for a in spec.attacks.names]]
    methods = [m.label for m in spec.methods]
    fig = Figure(figsize=(max(6.0, 1.2 * len(names) * len(concepts)), 4.2))
    for p, concept in enumerate(concepts):
        ax = fig.add_subplot(1, len(concepts), p + 1)
        width = 0.8 / max(1, len(methods))
        for i, m in enumerate(methods):
            stats: list[dict[str, Any]] = [
                mean_interval([r for r in rows if r["concept"] == concept and r["method"] == m and r["metric"] == n])
                for n in names
            ]
            if not any(s["cells"] for s in stats):
                continue
            xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(names))]
            ys = [100 * s["mean"] if s["cells"] else 0.0 for s in stats]
            err = [
                [max(0.0, y - 100 * s["ci95"][0]) if s["cells"] else 0.0 for y, s in zip(ys, stats, strict=True)],
                [max(0.0, 100 * s["ci95"][1] - y) if s["cells"] else 0.0 for y, s in zip(ys, stats, strict=True)],
            ]
            ax.bar(xs, ys, width, yerr=err, capsize=2, color=PALETTE[i % len(PALETTE)], label=m)
        ax.set_xticks(range(len(names)), [n.replace("asr:", "") for n in names], rotation=30, fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_title(f"erasing {concept!r}")
        ax.set_ylabel("ASR (%)")
        ax.grid(axis="y", alpha=0.3)
    fig.axes[0].legend(fontsize=7)
    return to_png(fig)


def write_plots(spec: StudySpec, study_dir: Path, out: Path) -> dict[str, Path]:
    """Write ``esr_psr.png`` and ``asr.png`` (those that have data) under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, png in (("esr_psr", esr_psr_curves(spec, study_dir)), ("asr", asr_bars(spec, study_dir))):
        if png is not None:
            path = out / f"{name}.png"
            with atomic_path(path) as tmp:
                Path(tmp).write_bytes(png)
            written[name] = path
    return written

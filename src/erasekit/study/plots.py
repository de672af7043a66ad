"""A study's figures (PNG, matplotlib's Agg canvas via :func:`erasekit.analysis.plots.to_png`):

- ``esr_psr.png``: each method's ESR-PSR trade-off on the selection images (one point per check of
  the operating-point rule; a line per cell, one colour per method), the target as a dashed line.
- ``asr.png``: ASR per method and attack, one panel per concept: a row per method, a marker per
  attack (and the pre-attack rate) with its 95% interval as a horizontal whisker, so that a dozen
  methods x five attacks stay readable.

Colours are distinct for every method (or attack) of a figure: the house palette for up to 8,
matplotlib's ``tab20`` beyond.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib import colormaps
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from erasekit.analysis.plots import PALETTE, to_png
from erasekit.io import atomic_path
from erasekit.study.spec import StudySpec
from erasekit.study.stats import mean_interval
from erasekit.study.tables import LABEL, curves, group_rows, tidy


def colours(n: int) -> list[str]:
    """``n`` distinct colours: :data:`erasekit.analysis.plots.PALETTE` when it has enough, else ``tab20``'s
    (a figure with more than 20 series repeats them)."""
    if n <= len(PALETTE):
        return list(PALETTE[:n])
    tab = [to_hex(c) for c in colormaps["tab20"].colors]
    return [tab[i % len(tab)] for i in range(n)]


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
    colour = dict(zip([m.label for m in spec.methods], colours(len(spec.methods)), strict=True))
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
    """ASR per method and attack (mean over seeds, 95% interval): a row per method, a marker per attack;
    ``None`` without attack results."""
    if spec.attacks is None:
        return None
    rows = tidy(spec, study_dir)
    concepts = [
        c.label for c in spec.concepts if any(r["concept"] == c.label and r["metric"].startswith("asr:") for r in rows)
    ]
    if not concepts:
        return None
    names = ["pre_attack", *[f"asr:{a}" for a in spec.attacks.names]]
    colour = colours(len(names))
    methods = [m.label for m in spec.methods]
    fig = Figure(figsize=(5.0 * len(concepts) + 1.6, 0.9 + 0.42 * len(methods)))
    grouped = group_rows(rows, "concept", "method", "metric")
    for p, concept in enumerate(concepts):
        ax = fig.add_subplot(1, len(concepts), p + 1)
        shown = [m for m in methods if any(key[:2] == (concept, m) for key in grouped)]
        step = 0.7 / max(1, len(names))
        for j, n in enumerate(names):
            ys, xs, lo, hi = [], [], [], []
            for i, m in enumerate(shown):
                st = mean_interval(grouped.get((concept, m, n), []))
                if not st["cells"]:
                    continue
                x = 100 * st["mean"]
                ys.append(i + (j - (len(names) - 1) / 2) * step)
                xs.append(x)
                lo.append(max(0.0, x - 100 * st["ci95"][0]))
                hi.append(max(0.0, 100 * st["ci95"][1] - x))
            label = n.replace("asr:", "") if n != "pre_attack" else "no attack"
            ax.errorbar(xs, ys, xerr=[lo, hi], fmt="o", ms=4, lw=1, capsize=1.5, color=colour[j], label=label)
        ax.set_yticks(range(len(shown)), shown, fontsize=8)
        ax.set_ylim(len(shown) - 0.5, -0.5)  # the spec's first method on top
        ax.set_xlim(-2, 102)
        ax.set_xlabel("ASR (%), 95% interval")
        ax.set_title(f"erasing {concept!r}")
        ax.grid(axis="x", alpha=0.3)
        for i in range(1, len(shown)):
            ax.axhline(i - 0.5, color="#dddddd", lw=0.6)
    fig.axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="attack", title_fontsize=7)
    fig.tight_layout()
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

"""Intervals for a study's tables: Wilson for one proportion, a percentile bootstrap for a mean over
cells (splits and seeds).

- One cell's rate (ESR-1 of 250 test images, ASR of 50 prompts) is a binomial proportion: its 95%
  interval is Wilson's (``erasekit.eval.metrics.wilson_interval``).
- A method's mean over cells gets a 95% percentile bootstrap interval: resample the cells with
  replacement ``n_boot`` times (a fixed seed, so a table is reproducible) and take the 2.5% and 97.5%
  quantiles of the resampled means (Efron & Tibshirani 1993, ch. 13). With a single cell there is
  nothing to resample, and the interval is that cell's Wilson interval; with 2-3 cells the bootstrap
  interval is narrow by construction (it only sees the cells' spread), which the tables say.
- Cells grouped by concept set (``by="concept"``: 4 splits, split 0 with 3 training seeds) are
  averaged in two stages, so that every concept set weighs the same whatever its number of seeds
  (a seeded method's extra split-0 seeds would otherwise pull its mean towards split 0, and a
  deterministic method, which has one cell per set, would be averaged over other weights): the mean
  is the mean over sets of each set's mean over its seeds, and the bootstrap is two-level (Davison &
  Hinkley 1997, sec. 3.8): draw the sets with replacement, then within each drawn set its seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from erasekit.eval.metrics import wilson_interval

N_BOOT = 2000
BOOT_SEED = 0


def wilson(successes: int, n: int) -> tuple[float, float]:
    """95% Wilson interval of ``successes / n``."""
    return wilson_interval(successes, n)


def bootstrap_mean(values: Sequence[float], *, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of ``values`` (resampled with replacement)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    if v.size == 1:
        return float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(lo), float(hi)


def nested_bootstrap_mean(
    groups: Sequence[Sequence[float]], *, n_boot: int = N_BOOT, seed: int = BOOT_SEED
) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean over ``groups`` of each group's mean, resampling
    the groups with replacement and, within each drawn group, its values with replacement."""
    gs = [np.asarray(g, dtype=np.float64) for g in groups if len(g)]
    if not gs:
        return float("nan"), float("nan")
    if len(gs) == 1:
        return bootstrap_mean(gs[0], n_boot=n_boot, seed=seed)
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, len(gs), size=(n_boot, len(gs)))
    means = np.empty(n_boot)
    for b in range(n_boot):
        means[b] = np.mean([gs[i][rng.integers(0, gs[i].size, size=gs[i].size)].mean() for i in drawn[b]])
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(lo), float(hi)


def mean_interval(cells: Sequence[dict[str, Any]], *, by: str | None = None) -> dict[str, Any]:
    """Summary of one metric over cells, each ``{"rate", "successes", "n"}``: the mean rate and its 95%
    interval (Wilson for one cell, bootstrap over cells otherwise). With ``by`` (a key of the cells,
    e.g. ``"concept"``) and more than one group, the mean over groups of each group's mean, with the
    two-level bootstrap interval of :func:`nested_bootstrap_mean` (``"groups"`` counts the groups)."""
    if by is not None:
        groups: dict[Any, list[float]] = {}
        for c in cells:
            groups.setdefault(c[by], []).append(float(c["rate"]))
        if len(groups) > 1:
            lo, hi = nested_bootstrap_mean(list(groups.values()))
            return {
                "mean": float(np.mean([np.mean(g) for g in groups.values()])),
                "ci95": [lo, hi],
                "cells": len(cells),
                "groups": len(groups),
                "interval": "bootstrap-nested",
            }
    rates = [float(c["rate"]) for c in cells]
    if not rates:
        return {"mean": float("nan"), "ci95": [float("nan"), float("nan")], "cells": 0, "interval": "none"}
    if len(cells) == 1:
        lo, hi = wilson(int(cells[0]["successes"]), int(cells[0]["n"]))
        kind = "wilson"
    else:
        lo, hi = bootstrap_mean(rates)
        kind = "bootstrap"
    return {"mean": float(np.mean(rates)), "ci95": [lo, hi], "cells": len(rates), "interval": kind}

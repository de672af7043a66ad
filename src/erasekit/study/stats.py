"""Intervals for a study's tables: Wilson for one proportion, a percentile bootstrap for a mean over
cells (splits and seeds).

- One cell's rate (ESR-1 of 250 test images, ASR of 50 prompts) is a binomial proportion: its 95%
  interval is Wilson's (``erasekit.eval.metrics.wilson_interval``).
- A method's mean over cells (4 splits, 3 seeds) gets a 95% percentile bootstrap interval: resample
  the cells with replacement ``n_boot`` times (a fixed seed, so a table is reproducible) and take the
  2.5% and 97.5% quantiles of the resampled means (Efron & Tibshirani 1993, ch. 13). With a single
  cell there is nothing to resample, and the interval is that cell's Wilson interval; with 2-3 cells
  the bootstrap interval is narrow by construction (it only sees the cells' spread), which the
  tables say.
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


def mean_interval(cells: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Summary of one metric over cells, each ``{"rate", "successes", "n"}``: the mean rate and its 95%
    interval (Wilson for one cell, bootstrap over cells otherwise)."""
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

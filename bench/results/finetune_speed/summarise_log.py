"""Medians of a bench_finetune.py log (for a run stopped before it wrote its JSON)."""

import json
import re
import statistics
import sys

cells = {}
for line in open(sys.argv[1]):
    m = re.match(
        r"threads=(\d+) rep=(\d+)\s+(\S+)\s+(\S+)?:?\s+([\d.]+) ms/step", line.replace("floor       :", "floor floor:")
    )
    if m:
        th, rep, meth, prod, ms = m.groups()
        key = f"{meth}|{prod.rstrip(':')}" if meth != "floor" else "floor"
        cells.setdefault(th, {}).setdefault(key, []).append(float(ms))
out = {}
for th, c in cells.items():
    med = {k: statistics.median(v) for k, v in c.items()}
    s = {"n_reps": {k: len(v) for k, v in c.items()}, "median_ms_per_step": med}
    for m in ("esd", "ap"):
        if f"{m}|exact" in med and f"{m}|pooled" in med:
            s[f"{m}_speedup_pooled_vs_exact"] = round(med[f"{m}|exact"] / med[f"{m}|pooled"], 3)
        if f"{m}|pooled" in med and "floor" in med:
            s[f"{m}_pooled_over_floor"] = round(med[f"{m}|pooled"] / med["floor"], 3)
    for p in ("exact", "pooled"):
        if f"ap|{p}" in med and f"esd|{p}" in med:
            s[f"ap_over_esd_{p}"] = round(med[f"ap|{p}"] / med[f"esd|{p}"], 3)
    out[th] = s
print(json.dumps(out, indent=1))

"""Mass erasure on the miniature: SPEED and MACE beside UCE and RECE (issue 20).

Two tasks, every method given the same request:

- the 4 splits of bench/table1.py (erase 5 objects, ``preserve`` = the other 5), ESR-1/3 over the
  erased objects and PSR-1/3 over the kept ones from the ``shapes-objects`` protocol;
- ``all16``: all 10 objects + the unsafe motif ("fire") + the 5 artists at once, ``preserve`` =
  the 6 colours and 4 backgrounds (the neutral attributes). No object is kept, so PSR is
  undefined; the prior column is the detector's colour top-1 over all images ("colour-1", the
  original model's value beside it), which the edit should leave alone.

Unlike bench/table1.py (whose UCE/RECE rows pass no ``preserve``), the closed forms here get the
kept concepts as their preserve/retain set, so the comparison is what each method does with the
same information. Methods run with their default presets; the closed forms' erase time is wall
time on the CPU, the evaluation (50 images per object, the miniature's 20 DDIM steps) dominates.

    python bench/mass_erasure.py --threads 1                      # every row and task
    python bench/mass_erasure.py --rows speed,uce --tasks 0,all16
    python bench/mass_erasure.py --tiny                           # smoke test (numbers mean nothing)
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

import erasekit
from erasekit.analysis.spectrum import edit_applied
from erasekit.edit import EraseRequest
from erasekit.eval.generate import SamplingConfig
from erasekit.eval.protocols import evaluate
from erasekit.io import write_json_atomic, write_text_atomic
from erasekit.study.operating import StandinDetector
from erasekit.study.spec import load_spec
from erasekit.world.shapes import ARTISTS, BACKGROUNDS, COLOURS, OBJECTS, UNSAFE

# the 4 splits of the Table 1 study (bench/studies/table1.toml, which replaced bench/table1.py)
SPLITS = [list(c.erase) for c in load_spec(Path(__file__).parent / "studies" / "table1.toml", check_model=False).concepts]

ROWS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "original": (None, {}),
    "uce": ("uce", {}),
    "rece": ("rece", {}),
    "speed": ("speed", {}),
    "speed-fast": ("speed", {"preset": "fast"}),
    # added after the default SPEED (keys = last subject token) erased nothing on split 0: the same
    # method with UCE's keys (last word token to the end of the sequence)
    "speed-to-end": ("speed", {"tokens": "to_end"}),
    "mace": ("mace", {}),
}
LABELS = {
    "original": "Original",
    "uce": "UCE",
    "rece": "RECE",
    "speed": "SPEED",
    "speed-fast": "SPEED (shared)",
    "speed-to-end": "SPEED (to_end keys)",
    "mace": "MACE",
}
ALL16 = [*OBJECTS, UNSAFE, *ARTISTS]
NEUTRAL = [*COLOURS, *BACKGROUNDS]


def request_for(task: str) -> tuple[EraseRequest, list[str]]:
    """The erase request of a task and the objects erased (for ESR)."""
    if task == "all16":
        return EraseRequest(list(ALL16), preserve=list(NEUTRAL)), list(OBJECTS)
    erase = SPLITS[int(task)]
    return EraseRequest(list(erase), preserve=[o for o in OBJECTS if o not in erase]), list(erase)


def run_cell(pipe, row: str, task: str, args, detector, sampling) -> dict[str, Any]:
    """Erase (timed) and evaluate one (row, task)."""
    method, extra = ROWS[row]
    request, erased_objects = request_for(task)
    kw = dict(extra)
    preset = kw.pop("preset", None)
    if method == "mace":
        kw.update(args.mace_kw)
    edit, seconds = None, 0.0
    if method is not None:
        t0 = time.perf_counter()
        try:
            edit = erasekit.erase(pipe, request, method=method, preset=preset, progress=not args.quiet, **kw)
        except ValueError as e:  # e.g. SPEED's null space too small: a result, recorded
            return {"error": str(e), "erase": request.erase, "preserve": request.preserve}
        seconds = time.perf_counter() - t0
    with edit_applied(pipe, edit) if edit is not None else nullcontext():
        res = evaluate(
            pipe,
            "shapes-objects",
            erase=erased_objects,
            n_per_class=args.n_per_class,
            seed=args.seed,
            sampling=sampling,
            detector=detector,
            progress=not args.quiet,
        )
    cell = {m: res[m] for m in ("esr_1", "esr_3", "psr_1", "psr_3", "colour_top1_all")}
    cell.update(
        erase_seconds=round(seconds, 3), eval_seconds=res["seconds"], erase=request.erase, preserve=request.preserve
    )
    if edit is not None and "seconds" in edit.trace:
        cell["method_seconds"] = edit.trace["seconds"]
    return cell


def _fmt(vals: list[float]) -> str:
    return f"{np.mean(vals):.1f} ± {np.std(vals):.1f}" if len(vals) > 1 else f"{vals[0]:.1f}"


def summarise(results: dict[str, Any]) -> str:
    """Two markdown tables: the 4 splits (mean ± std) and the 16-concept task."""
    lines = [
        "### 5 erased / 5 kept objects (4 splits of bench/table1.py; mean ± std)",
        "",
        "| Method | ESR-1 | ESR-3 | PSR-1 | PSR-3 | erase time (s) | splits |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        cells = [results["cells"][f"{row}|{s}"] for s in range(4) if f"{row}|{s}" in results["cells"]]
        errors = [c["error"] for c in cells if "error" in c]
        cells = [c for c in cells if "error" not in c]
        if errors:
            lines.append(f"| {LABELS[row]} | refused on {len(errors)} split(s): {errors[0][:160]} | | | | | |")
        if not cells:
            continue
        out = [LABELS[row]]
        for m in ("esr_1", "esr_3", "psr_1", "psr_3"):
            out.append(_fmt([100 * c[m] for c in cells]))
        out += [f"{np.mean([c['erase_seconds'] for c in cells]):.2f}", str(len(cells))]
        lines.append("| " + " | ".join(out) + " |")
    lines += [
        "",
        "### 16 concepts at once (10 objects + fire + 5 artists; preserve = colours and backgrounds)",
        "",
        "| Method | ESR-1 (objects) | ESR-3 | colour-1 (all images) | erase time (s) |",
        "|---|---|---|---|---|",
    ]
    for row in ROWS:
        c = results["cells"].get(f"{row}|all16")
        if c is None:
            continue
        if "error" in c:
            lines.append(f"| {LABELS[row]} | refused: {c['error'][:160]} | | | |")
            continue
        lines.append(
            f"| {LABELS[row]} | {100 * c['esr_1']:.1f} | {100 * c['esr_3']:.1f} | {100 * c['colour_top1_all']:.1f} | "
            f"{c['erase_seconds']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows from {list(ROWS)}")
    p.add_argument("--tasks", default="0,1,2,3,all16", help="comma-separated tasks: split indices 0-3 and/or all16")
    p.add_argument("--n-per-class", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mace-steps", type=int, default=None, help="MACE LoRA steps per concept (default: the preset's)")
    p.add_argument("--out", default="bench/results/mass-erasure")
    p.add_argument("--tiny", action="store_true", help="smoke test: random tiny model, stand-in detector")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if any(t not in ("0", "1", "2", "3", "all16") for t in tasks):
        p.error("--tasks must be split indices 0-3 and/or all16")
    args.mace_kw = {} if args.mace_steps is None else {"steps": args.mace_steps}
    if args.tiny:
        from erasekit.testing import tiny_pipeline

        pipe, sampling, detector = (
            tiny_pipeline(0),
            SamplingConfig(steps=2, guidance_scale=3.0, batch_size=50),
            StandinDetector(),
        )
    else:
        from erasekit.eval.detectors import load_detector

        pipe, sampling, detector = erasekit.load_pipeline("shapes"), None, load_detector("shapes")
    settings = {
        "model": "tiny" if args.tiny else "shapes",
        "base": erasekit.pipeline.base_info(pipe).get("fingerprint"),
        "n_per_class": args.n_per_class,
        "seed": args.seed,
        "mace": args.mace_kw,
    }
    out = Path(args.out)
    path = out / "results.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"settings": settings, "cells": {}}
    if results["settings"] != settings:
        raise SystemExit(f"{path} was made with other settings ({results['settings']}); use another --out.")
    for task in tasks:
        for row in rows:
            if row == "original" and task != "all16":
                continue  # the original model's split numbers are in bench/results/table1
            key = f"{row}|{task}"
            if key in results["cells"]:
                continue
            print(f"== {row} task {task}", flush=True)
            results["cells"][key] = run_cell(pipe, row, task, args, detector, sampling)
            write_json_atomic(path, results)
            write_text_atomic(out / "mass_erasure.md", summarise(results))
    table = summarise(results)
    write_text_atomic(out / "mass_erasure.md", table)
    if args.tiny:
        print("SMOKE TEST: random tiny model and a stand-in detector; the numbers mean nothing.")
    print(table)
    return results


if __name__ == "__main__":
    main()

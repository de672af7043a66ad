"""A study folder: ``study.json`` (the spec that made it), ``cells/<cell>/`` (one run directory per
cell) and the outputs (``results.csv``, ``results.json``, ``table.md``, ``timing.md``, ``curves.json``,
``esr_psr.png``, ``asr.png``). A folder made from another spec is refused, naming the differing fields,
unless ``force`` (then the cells whose identity changed are redone; the others are kept).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from erasekit.io import write_json_atomic
from erasekit.rundir import RunDirMismatch, identity_diff
from erasekit.study.executors import run_cells
from erasekit.study.grid import cell_status, cells
from erasekit.study.plots import write_plots
from erasekit.study.spec import StudySpec, load_spec
from erasekit.study.tables import write_tables

STUDY_JSON = "study.json"


def study_dir_for(spec: StudySpec, directory: str | Path | None) -> Path:
    return Path(directory) if directory is not None else spec.default_dir()


def open_study(spec: StudySpec, directory: str | Path | None = None, *, force: bool = False) -> Path:
    """Create or reopen the study folder for ``spec`` (refuses another spec's folder unless ``force``)."""
    d = study_dir_for(spec, directory)
    meta_path = d / STUDY_JSON
    ident = spec.identity()
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old.get("spec") != ident and not force:
            diff = identity_diff(old.get("spec") or {}, ident)
            raise RunDirMismatch(
                d,
                diff,
                "study folder",
                detail=f"was made from another spec (differing: {'; '.join(diff)}); use the same spec, another "
                "--dir, or --force (cells whose settings changed are redone, the others kept)",
            )
    d.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        meta_path, {"name": spec.name, "digest": spec.digest(), "spec": ident, "spec_path": str(spec.path)}
    )
    return d


def run_study(
    spec_path: str | Path,
    directory: str | Path | None = None,
    *,
    workers: int = 1,
    threads: int | None = None,
    ray: str | None = None,
    gpus_per_cell: float = 0.0,
    force: bool = False,
    only: str | None = None,
    max_cells: int | None = None,
    progress: bool = True,
    tables: bool = True,
) -> dict[str, Any]:
    """Run every cell of the spec that is not done (validated first: a bad spec runs nothing); then
    write the tables. ``only`` runs the cells whose key contains that text; ``max_cells`` stops after
    that many. Returns ``{"dir", "ran": [...], "counts": {...}, "seconds"}``."""
    spec = load_spec(spec_path)
    d = open_study(spec, directory, force=force)
    todo = [c for c in cells(spec) if cell_status(d, c, spec)["state"] != "done"]
    if only:
        todo = [c for c in todo if only in c.key]
    if max_cells is not None:
        todo = todo[:max_cells]
    t0 = time.perf_counter()

    def refresh(_: dict[str, Any]) -> None:  # the tables after every cell (plots once, at the end)
        if tables:
            write_tables(spec, d, d)

    ran = run_cells(
        spec,
        d,
        todo,
        workers=workers,
        threads=threads,
        ray=ray,
        gpus_per_cell=gpus_per_cell,
        force=force,
        progress=progress,
        on_result=refresh,
    )
    if tables:
        write_outputs(spec, d)
    return {"dir": d, "ran": ran, "counts": status(spec, d)["counts"], "seconds": round(time.perf_counter() - t0, 2)}


def status(spec: StudySpec, directory: str | Path | None = None) -> dict[str, Any]:
    """Every cell's state (done / failed with its error / started / todo) and the counts."""
    d = study_dir_for(spec, directory)
    states = [cell_status(d, c, spec) for c in cells(spec)]
    return {"dir": d, "cells": states, "counts": dict(Counter(s["state"] for s in states))}


def write_outputs(spec: StudySpec, directory: Path, out: Path | None = None) -> dict[str, Path]:
    """Tables and plots of the done cells, into ``out`` (default: the study folder)."""
    out = Path(out) if out is not None else Path(directory)
    return {**write_tables(spec, directory, out), **write_plots(spec, directory, out)}

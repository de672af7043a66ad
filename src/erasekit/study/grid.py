"""The grid of a study: one cell per (method, concept set, training seed), each a run directory.

Cells are ordered so that the most informative finish first: every method on the first seed of the
first concept set, then the first seed of the next sets, then the further seeds. Deterministic
methods (closed forms: their config has no ``seed``; and ``original``) get one cell per concept set,
the first seed's: other seeds would give the same edit.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from erasekit.methods.base import get_method
from erasekit.rundir import RunDir, RunDirMismatch
from erasekit.study.spec import ConceptEntry, MethodEntry, StudySpec

CELLS_DIR = "cells"
CELL_STAGE = "cell"
RESULT_JSON = "result.json"
SEARCH_CACHE = "attack_search"  # <study>/attack_search/: edit-independent attack outputs, shared by the cells


def slug(text: str) -> str:
    """A file-name-safe form of a label (``"AP (η=1)"`` -> ``"ap-1"``)."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s or "x"


def seeded(method: MethodEntry) -> bool:
    """Whether the method's result depends on a training seed (its config has a ``seed``)."""
    if method.is_original:
        return False
    return "seed" in get_method(method.method).config_class.__dataclass_fields__


def finetuned(method: MethodEntry) -> bool:
    """Whether the method trains through the fine-tuning core (resumable in chunks)."""
    if method.is_original:
        return False
    return "stop_at" in get_method(method.method).config_class.__dataclass_fields__


@dataclass(frozen=True)
class Cell:
    method: MethodEntry
    concept: ConceptEntry
    seed: int
    order: tuple[int, int, int]  # (seed rank, concept rank, method rank)

    @property
    def key(self) -> str:
        return f"{slug(self.method.label)}__{slug(self.concept.label)}__seed{self.seed}"

    def identity(self, spec: StudySpec) -> dict[str, Any]:
        """What determines this cell's result (the cell run directory's identity)."""
        ident = spec.identity()
        return {
            "study": spec.name,
            "model": spec.model,
            "detector": spec.detector,
            "method": _asdict(self.method),
            "concept": {k: v for k, v in _asdict(self.concept).items() if k != "methods"} | {"seeds": None},
            "seed": self.seed,
            "evaluation": ident["evaluation"],
            "operating_point": ident["operating_point"],
            "attacks": ident["attacks"],
        }


def _asdict(x: Any) -> dict[str, Any]:
    return asdict(x)


def cells(spec: StudySpec) -> list[Cell]:
    """Every cell of the study, most informative first (see the module docstring)."""
    out = []
    for ci, concept in enumerate(spec.concepts):
        for mi, method in enumerate(spec.methods):
            if concept.methods is not None and method.label not in concept.methods:
                continue
            seeds = concept.seeds if seeded(method) else concept.seeds[:1]
            for si, seed in enumerate(seeds):
                out.append(Cell(method, concept, seed, (si, ci, mi)))
    return sorted(out, key=lambda c: c.order)


def cell_dir(study_dir: Path, cell: Cell) -> Path:
    return Path(study_dir) / CELLS_DIR / cell.key


def study_of(cell_path: Path) -> Path:
    """The study folder of a cell folder (``<study>/cells/<key>``)."""
    return Path(cell_path).parent.parent


def open_cell(study_dir: Path, spec: StudySpec, cell: Cell, *, force: bool = False) -> RunDir:
    """The cell's run directory; with ``force``, a cell made with another identity is emptied and remade."""
    path = cell_dir(study_dir, cell)
    try:
        return RunDir.create(path, cell.identity(spec))
    except RunDirMismatch:
        if not force:
            raise
        shutil.rmtree(path)
        return RunDir.create(path, cell.identity(spec))


def cell_status(study_dir: Path, cell: Cell, spec: StudySpec | None = None) -> dict[str, Any]:
    """``{"key", "state": "done"|"failed"|"started"|"todo"|"stale", "error"?}`` from the cell's stages;
    with ``spec``, a cell folder made with other settings is ``stale`` (redone by ``run --force``)."""
    path = cell_dir(study_dir, cell)
    if not (path / "run.json").exists():
        return {"key": cell.key, "state": "todo"}
    rd = RunDir.open(path)
    if spec is not None and rd.identity != json.loads(json.dumps(cell.identity(spec), sort_keys=True, default=str)):
        return {"key": cell.key, "state": "stale"}
    st = rd.stage(CELL_STAGE)
    if st is None:
        return {"key": cell.key, "state": "started", "checks": len(rd.records("curve.jsonl"))}
    out = {"key": cell.key, "state": st["status"]}
    if st["status"] == "failed":
        out["error"] = st.get("error")
    return out

"""Where a study's cells run: in this process, in a local process pool, or as Ray tasks on a cluster.

Every executor calls :func:`erasekit.study.operating.run_cell` once per cell that is not done; each
cell writes its own run directory under the shared study folder (its lock keeps two workers off one
cell), so the resume rules are the same everywhere: a done cell is skipped, a failed one is retried,
and a failure never stops the others.

- ``workers=1`` (default): the cells one after the other in this process.
- ``workers=N``: a ``spawn`` process pool of N; each worker gets ``threads`` torch threads (default
  ``cpu_count // N``, at least 1), so the machine is not oversubscribed.
- ``ray="auto"`` or an address: each cell is a Ray task with ``num_cpus=threads`` and ``num_gpus``
  (``pip install 'erasekit[ray]'``); the study folder must be on storage every node sees.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from erasekit.study.grid import Cell, cells
from erasekit.study.operating import run_cell, set_threads
from erasekit.study.spec import StudySpec, load_spec


def _cell_by_key(spec: StudySpec, key: str) -> Cell:
    for c in cells(spec):
        if c.key == key:
            return c
    raise KeyError(key)


def _worker(spec_path: str, study_dir: str, key: str, threads: int | None, force: bool) -> dict[str, Any]:
    """A pool worker / Ray task: reload the spec (cheap, no model check), run one cell."""
    set_threads(threads)
    spec = load_spec(spec_path, check_model=False)
    return run_cell(spec, _cell_by_key(spec, key), Path(study_dir), force=force)


def run_cells(
    spec: StudySpec,
    study_dir: Path,
    todo: Sequence[Cell],
    *,
    workers: int = 1,
    threads: int | None = None,
    ray: str | None = None,
    gpus_per_cell: float = 0.0,
    force: bool = False,
    progress: bool = True,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run ``todo`` (in their order) with the chosen executor; returns each cell's ``{"key", "state", ...}``."""
    if workers < 1:
        raise ValueError(f"`workers` must be >= 1, got {workers}.")
    if spec.path is None:
        raise ValueError("The spec must come from a file (load_spec) so that workers can reload it.")
    bar = tqdm(total=len(todo), desc=f"study {spec.name}", disable=not progress)
    out: list[dict[str, Any]] = []

    def done(r: dict[str, Any]) -> None:
        out.append(r)
        bar.update(1)
        bar.set_postfix_str(f"{r['key']}: {r['state']}")
        if on_result is not None:
            on_result(r)

    try:
        if ray is not None:
            for r in _run_ray(spec, study_dir, todo, ray=ray, threads=threads or 1, gpus=gpus_per_cell, force=force):
                done(r)
        elif workers == 1:
            set_threads(threads)
            for c in todo:
                done(run_cell(spec, c, study_dir, force=force))
        else:
            per = threads or max(1, (os.cpu_count() or 1) // workers)
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
                futs = [pool.submit(_worker, str(spec.path), str(study_dir), c.key, per, force) for c in todo]
                for f in as_completed(futs):
                    done(f.result())
    finally:
        bar.close()
    return out


def _run_ray(
    spec: StudySpec, study_dir: Path, todo: Sequence[Cell], *, ray: str, threads: int, gpus: float, force: bool
) -> Iterator[dict[str, Any]]:
    try:
        import ray as ray_mod
    except ImportError:
        raise ValueError("The Ray executor needs ray: pip install 'erasekit[ray]' (or drop --ray).") from None
    started = False
    if not ray_mod.is_initialized():
        ray_mod.init(address=None if ray == "local" else ray, ignore_reinit_error=True, log_to_driver=False)
        started = True
    try:
        task = ray_mod.remote(num_cpus=threads, num_gpus=gpus)(_worker)
        refs = [
            task.remote(str(Path(spec.path).resolve()), str(Path(study_dir).resolve()), c.key, threads, force)
            for c in todo
        ]
        pending = list(refs)
        while pending:
            ready, pending = ray_mod.wait(pending, num_returns=1)
            yield from ray_mod.get(ready)
    finally:
        if started:
            ray_mod.shutdown()

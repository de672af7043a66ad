"""``erasekit study run|status|table|plot SPEC``: the command line of :mod:`erasekit.study`.

The main CLI mounts this app with ``app.add_typer(study.app, name="study")``; its commands share the
one error handler of every command (:class:`erasekit.cli.common.App`). Imports of the library
happen inside the commands, so ``erasekit --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from erasekit.cli.common import App
from erasekit.study.api import run_study, status, study_dir_for
from erasekit.study.plots import write_plots
from erasekit.study.spec import load_spec
from erasekit.study.tables import write_tables

app = App(
    help="Studies: method x concept x seed grids to the paper's operating point (docs/studies.md).",
    no_args_is_help=True,
)

SpecArg = Annotated[Path, typer.Argument(help="The study spec (TOML; see docs/studies.md).")]
DirOpt = Annotated[
    Path | None,
    typer.Option("--dir", help="The study folder (default: the spec's [study] dir, else runs/studies/NAME)."),
]


@app.command("run")
def run(
    spec: SpecArg,
    directory: DirOpt = None,
    workers: Annotated[int, typer.Option(help="Cells run at once in a local process pool (1: in this process).")] = 1,
    threads: Annotated[
        int | None, typer.Option(help="Torch threads per cell (default: CPU cores / workers; with --ray: 1).")
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option(help="Run each cell as a Ray task: 'auto' (a running cluster), 'local', or a cluster ADDRESS."),
    ] = None,
    gpus: Annotated[float, typer.Option(help="--ray: GPUs per cell.")] = 0.0,
    force: Annotated[
        bool, typer.Option(help="Reuse a folder made from another spec (changed cells are redone).")
    ] = False,
    only: Annotated[str | None, typer.Option(help="Run only the cells whose key contains this text.")] = None,
    max_cells: Annotated[int | None, typer.Option(help="Stop after this many cells.")] = None,
) -> None:
    """Run every cell not done yet (a done cell is skipped, a failed one retried); write the tables."""
    out = run_study(
        spec,
        directory,
        workers=workers,
        threads=threads,
        ray=ray,
        gpus_per_cell=gpus,
        force=force,
        only=only,
        max_cells=max_cells,
    )
    failed = [r for r in out["ran"] if r["state"] == "failed"]
    for r in failed:
        typer.secho(f"failed: {r['key']}: {r['error']}", fg=typer.colors.RED, err=True)
    typer.echo(f"{out['dir']}: {json.dumps(out['counts'], sort_keys=True)} ({out['seconds']:.0f} s)")
    if failed:
        raise typer.Exit(1)


@app.command("status")
def status_cmd(spec: SpecArg, directory: DirOpt = None) -> None:
    """Each cell's state: done, failed (with its error), started, todo."""
    st = status(load_spec(spec, check_model=False), directory)
    for c in st["cells"]:
        extra = f"  {c['error']}" if c.get("error") else (f"  ({c['checks']} checks)" if "checks" in c else "")
        typer.echo(f"{c['state']:8s} {c['key']}{extra}")
    typer.echo(f"{st['dir']}: {json.dumps(st['counts'], sort_keys=True)}")


@app.command("table")
def table(
    spec: SpecArg,
    directory: DirOpt = None,
    out: Annotated[Path | None, typer.Option(help="Folder for the tables (default: the study folder).")] = None,
) -> None:
    """Write results.csv/json (tidy), table.md (the papers' layout), timing.md, curves.json; print table.md."""
    s = load_spec(spec, check_model=False)
    d = study_dir_for(s, directory)
    paths = write_tables(s, d, out or d)
    typer.echo(paths["markdown"].read_text())


@app.command("plot")
def plot(
    spec: SpecArg,
    directory: DirOpt = None,
    out: Annotated[Path | None, typer.Option(help="Folder for the PNGs (default: the study folder).")] = None,
) -> None:
    """Write esr_psr.png (ESR-PSR curves per method) and asr.png (ASR per attack)."""
    s = load_spec(spec, check_model=False)
    d = study_dir_for(s, directory)
    for name, path in write_plots(s, d, out or d).items():
        typer.echo(f"{name}: {path}")

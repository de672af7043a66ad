"""`serve`: the web app (optional extra erasekit[ui])."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from erasekit.cli.common import ModelOpt


def serve(
    model: ModelOpt = "shapes",
    runs: Annotated[Path, typer.Option(help="Runs directory: every run the page names is resolved inside it.")] = Path(
        "runs"
    ),
    host: Annotated[str, typer.Option(help="Interface to bind (default: this machine only).")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="Port (default: Gradio's, 7860 or the next free one).")] = None,
    workers: Annotated[int, typer.Option(help="Jobs run at the same time (each holds its own pipeline).")] = 1,
    device: Annotated[str, typer.Option(help="torch device of the jobs.")] = "cpu",
) -> None:
    """A web app over the runs directory: erase, compare, evaluate/attack, export, report (needs erasekit[ui])."""
    try:
        from erasekit.serve.app import serve as run_app
    except ImportError as e:
        raise ImportError(f"`erasekit serve` needs Gradio: pip install 'erasekit[ui]' ({e}).") from None
    run_app(model=model, runs=runs, host=host, port=port, workers=workers, device=device)

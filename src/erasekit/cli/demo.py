"""`demo`: the two-minute tour on the miniature."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from erasekit.cli.common import out_dir
from erasekit.demo import run_demo


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", parser=out_dir, help="Demo run directory.")] = Path("runs/demo"),
    concept: Annotated[str, typer.Option(help="Object to erase.")] = "triangle",
    n_per_class: Annotated[int, typer.Option(help="Images per object class and model.")] = 20,
) -> None:
    """Erase one object from the miniature with UCE, evaluate before/after, write report.html."""
    run_demo(out, concept=concept, n_per_class=n_per_class)

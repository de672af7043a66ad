"""`report`: one self-contained HTML page of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from erasekit.cli.common import out_dir, split_list
from erasekit.eval.generate import SamplingConfig, parse_seeds
from erasekit.report.run_report import build_run_report


def report_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory of `erasekit erase --out`.")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Base model (default: the edit's own).")] = None,
    seeds: Annotated[str, typer.Option(help="Seeds of the before/after grids: '0:6' or '1,5,7'.")] = "0:6",
    preserve: Annotated[list[str] | None, typer.Option("--preserve", "-p", help="Preserved concepts to show.")] = None,
    steps: Annotated[int | None, typer.Option(help="Sampler steps (default: the model's).")] = None,
    guidance: Annotated[float | None, typer.Option(help="Classifier-free guidance scale.")] = None,
    prompt_template: Annotated[str, typer.Option(help="Prompt of each concept, e.g. 'a photo of a {}'.")] = "{}",
    recovery_key: Annotated[Path | None, typer.Option(help="Hiding: check this recovery key against the edit.")] = None,
    rece_model: Annotated[
        str, typer.Option(help="RECE Fig. 5 images from each 'epoch' model or the 'final' one.")
    ] = "epoch",
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", parser=out_dir, help="Where to write the page (default: RUN/report.html)."),
    ] = None,
) -> None:
    """Write one self-contained HTML report of an erase run (request, config, before/after, metrics, traces, spectra)."""
    sampling = SamplingConfig(steps, guidance) if steps is not None or guidance is not None else None
    page = build_run_report(
        run,
        model=model,
        seeds=parse_seeds(seeds),
        preserve=split_list(preserve) or None,
        sampling=sampling,
        prompt_template=prompt_template,
        recovery_key=recovery_key,
        rece_model=rece_model,
        out=out,
    )
    typer.echo(f"report: {page}")

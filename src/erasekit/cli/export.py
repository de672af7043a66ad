"""`export`: an edit out of EraseKit (diffusers, LoRA, kohya, UNet)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from erasekit import Edit
from erasekit.cli.common import DtypeOpt, check_runtime, load_model, out_dir
from erasekit.export import format_report
from erasekit.export import push_to_hub as push
from erasekit.pipeline import BUNDLED


def export_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory (or edit folder) of `erasekit erase --out`.")],
    out: Annotated[
        Path, typer.Option("--out", "-o", parser=out_dir, help="Export directory (must not exist or be empty).")
    ],
    format: Annotated[str, typer.Option("--format", "-f", help="diffusers, lora, kohya or unet.")] = "diffusers",
    model: Annotated[str | None, typer.Option("--model", "-m", help="Base model (default: the edit's own).")] = None,
    revision: Annotated[
        str | None,
        typer.Option("--revision", help="Hub base model: its branch, tag or commit (default: the edit's own)."),
    ] = None,
    dtype: DtypeOpt = None,
    rank: Annotated[
        str | None, typer.Option(help="lora/kohya: LoRA rank, an integer or 'full' (default: full, exact).")
    ] = None,
    energy: Annotated[
        float | None, typer.Option(help="lora/kohya: keep the smallest rank with this share of sum(s_i^2).")
    ] = None,
    drop_bias: Annotated[bool, typer.Option("--drop-bias", help="kohya: leave bias deltas out (recorded).")] = False,
    metrics: Annotated[
        list[Path] | None, typer.Option("--metrics", help="metrics.json files for the model card (repeatable).")
    ] = None,
    license: Annotated[
        str | None, typer.Option(help="Model card license (default: the base card's, else other).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Model card title.")] = None,
    push_to_hub: Annotated[
        str | None, typer.Option("--push-to-hub", help="Also upload the export to this hub repo (user/name).")
    ] = None,
    public: Annotated[bool, typer.Option("--public", help="Create the hub repo public (default: private).")] = False,
) -> None:
    """Export an edit: a diffusers pipeline folder, a LoRA stock diffusers loads, a kohya LoRA file
    (A1111 / ComfyUI) or a UNet folder, each with a README.md model card and export.json."""
    check_runtime(dtype, "cpu")
    edit = Edit.load(run)
    if model is None and revision is None:  # the edit's own base, at the revision it was made from
        revision = edit.base.get("revision")
    base = model or (
        edit.base.get("id") if edit.base.get("id") in BUNDLED else edit.base.get("path") or edit.base.get("id")
    )
    if rank is not None and rank != "full":
        if not rank.isdigit():
            raise ValueError(f"`--rank` must be a positive integer or 'full', got {rank!r}.")
        rank_value: int | str | None = int(rank)
    else:
        rank_value = rank
    pipe = load_model(base, dtype=dtype, revision=revision, for_edits=[edit])
    res = edit.export(
        pipe,
        out,
        format,
        rank=rank_value,
        energy=energy,
        drop_bias=drop_bias,
        run_dir=run,
        metrics=list(metrics or []),
        license=license,
        model_name=name,
    )
    if res.lora is not None:
        typer.echo(format_report(res.lora))
    url = push(out, push_to_hub, private=not public) if push_to_hub else None
    typer.echo(f"{format} export of the {edit.method} edit -> {out} ({len(res.files)} files)")
    if url is not None:
        typer.echo(f"pushed to the hub: {push_to_hub}")

"""`world`: the miniature ShapesWorld (data, training, checks)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from erasekit.cli.common import App, DtypeOpt, ModelOpt, RevisionOpt, load_model
from erasekit.html import image_grid
from erasekit.pipeline import bundled_path
from erasekit.runs import parse_overrides
from erasekit.world.build import build_detector, build_pipeline, check_world, install_assets, save_check
from erasekit.world.clip import ClipRecipe, train_clip
from erasekit.world.recipe import WorldRecipe
from erasekit.world.shapes import make_example

app = App(help="The miniature ShapesWorld: data, training, checks.", no_args_is_help=True)


@app.command("train")
def world_train(
    out: Annotated[Path, typer.Option(help="Where to write the pipeline folder.")] = Path("runs/world/shapes-sd"),
    workdir: Annotated[Path, typer.Option(help="Cache of data, latents and checkpoints (resumable).")] = Path(
        "runs/world"
    ),
    steps: Annotated[int | None, typer.Option(help="UNet + text encoder steps (default: the recipe's).")] = None,
    install: Annotated[bool, typer.Option(help="Copy the result into the package's bundled assets.")] = False,
) -> None:
    """Train the miniature VAE, then UNet + text encoder, from scratch (resumes if interrupted)."""
    recipe = WorldRecipe() if steps is None else WorldRecipe(unet_steps=steps)
    path = build_pipeline(out, workdir, recipe)
    if install:
        install_assets(pipeline_dir=path)
    typer.echo(f"pipeline written to {path}")


@app.command("train-detector")
def world_train_detector(
    out: Annotated[Path, typer.Option(help="Where to write the detector.")] = Path("runs/world/detector"),
    workdir: Annotated[Path, typer.Option(help="Data cache.")] = Path("runs/world"),
    install: Annotated[bool, typer.Option(help="Copy the result into the package's bundled assets.")] = False,
) -> None:
    """Train the miniature detector (object, colour, background, style, unsafe heads)."""
    acc = build_detector(out, workdir)
    if install:
        install_assets(detector_dir=out)
    typer.echo(json.dumps({"heldout_accuracy": acc}, indent=2))


@app.command("train-clip")
def world_train_clip(
    out: Annotated[Path, typer.Option(help="Where to write the CLIP folder.")] = Path("runs/world/shapes-clip"),
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (default: the recipe's).")] = None,
    workdir: Annotated[Path, typer.Option(help="Data cache and resumable checkpoints.")] = Path("runs/world"),
    set_: Annotated[list[str] | None, typer.Option("--set", help="Recipe option KEY=VALUE (repeatable).")] = None,
) -> None:
    """Train the miniature CLIP contrastively on ShapesWorld (resumes if interrupted); print its zero-shot accuracy."""
    recipe = ClipRecipe(**parse_overrides(ClipRecipe, set_ or []))
    meta = train_clip(out, steps, workdir=workdir, recipe=recipe)
    typer.echo(json.dumps({"zero_shot": meta["zero_shot"], "parameters": meta["parameters"]}, indent=2))
    typer.echo(f"CLIP written to {out} (use it with --clip {out})")


@app.command("check")
def world_check(
    model: ModelOpt = "shapes",
    revision: RevisionOpt = None,
    dtype: DtypeOpt = None,
    n: Annotated[int, typer.Option(help="Images per concept.")] = 50,
    save: Annotated[bool, typer.Option(help="Store the result beside a local model's card.")] = False,
) -> None:
    """Detector accuracy on the model's own generations, per object, colour, style and unsafe phrasing."""
    pipe = load_model(model, dtype=dtype, revision=revision)
    res = check_world(pipe, n_per_concept=n)
    if save:
        save_check(bundled_path() if model == "shapes" else Path(model), res)
    typer.echo(json.dumps(res, indent=2))


@app.command("sample")
def world_sample(
    out: Annotated[Path, typer.Option(help="PNG file for a grid of real ShapesWorld images.")] = Path(
        "runs/world/sample.png"
    ),
    n: Annotated[int, typer.Option(help="Number of images.")] = 64,
    seed: Annotated[int, typer.Option(help="World seed.")] = 0,
) -> None:
    """Write a grid of real ShapesWorld images and print their captions."""
    imgs, caps = zip(*[(img, sc.caption) for img, sc in (make_example(seed, i) for i in range(n))], strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(list(imgs), cols=8, scale=3).save(out)
    typer.echo("\n".join(caps))
    typer.echo(f"grid: {out}")

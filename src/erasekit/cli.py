"""``erasekit``: a thin command line over the Python API."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Erase, hide, recover and audit concepts in text-to-image diffusion models.", no_args_is_help=True)
world_app = typer.Typer(help="The miniature ShapesWorld: data, training, checks.", no_args_is_help=True)
app.add_typer(world_app, name="world")

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="'shapes' (bundled miniature), a diffusers folder, or a hub id.")]
EditOpt = Annotated[Path | None, typer.Option("--edit", help="A run directory (or edit folder) whose edit to apply.")]


def _split(values: list[str] | None) -> list[str]:
    """Repeated options and comma-separated lists, flattened."""
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _load(model: str, edit: Path | None, device: str = "cpu"):
    from erasekit import Edit, load_pipeline

    pipe = load_pipeline(model, device=device)
    if edit is not None:
        Edit.load(edit).apply_(pipe)
    return pipe


@app.command()
def methods() -> None:
    """List the erasure methods and their options."""
    from dataclasses import MISSING, fields

    from erasekit import available_methods

    for name, spec in available_methods().items():
        typer.secho(f"{name}: {spec.summary}", bold=True)
        for f in fields(spec.config_class):
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            typer.echo(f"    {f.name} = {default!r}  {f.metadata.get('help', '')}")


@app.command()
def erase(
    erase: Annotated[list[str], typer.Option("--erase", "-e", help="Concept(s) to erase (repeat or comma-separate).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to write.")],
    method: Annotated[str, typer.Option(help="Erasure method (see `erasekit methods`).")] = "uce",
    preserve: Annotated[list[str] | None, typer.Option("--preserve", "-p", help="Concept(s) to preserve.")] = None,
    anchor: Annotated[str | None, typer.Option(help="What erased concepts become (default: the empty prompt).")] = None,
    model: ModelOpt = "shapes",
    set_: Annotated[list[str] | None, typer.Option("--set", help="Method option KEY=VALUE (repeatable).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed for methods that sample.")] = 0,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
    overwrite: Annotated[bool, typer.Option(help="Allow writing into a non-empty run directory.")] = False,
) -> None:
    """Erase concepts from a model and save the edit as a run directory."""
    import time
    import warnings

    import torch

    from erasekit import EraseRequest, get_method, load_pipeline
    from erasekit.runs import parse_overrides, run_dir, write_run_config

    try:
        spec = get_method(method)
        request = EraseRequest(_split(erase), _split(preserve), anchor)
        overrides = parse_overrides(spec.config_class, set_ or [])
        config = spec.config_class(**overrides)
        pipe = load_pipeline(model, device=device)
        _warn_split_words(pipe, request.erase + request.preserve)
        with run_dir(out, overwrite=overwrite) as d:
            t0 = time.time()
            with warnings.catch_warnings():
                warnings.simplefilter("default")
                edit = spec.fn(pipe, request, config, generator=torch.Generator().manual_seed(seed), progress=True)
            seconds = time.time() - t0
            edit.save(d)
            write_run_config(d, method=method, config=edit.config, request=edit.metadata()["request"], base=edit.base, seed=seed, seconds=seconds)
    except (ValueError, FileNotFoundError, FileExistsError, OSError, KeyError) as e:
        _fail(e)
    typer.echo(f"{method} erased {request.erase} in {seconds:.2f} s; {len(edit.tensors)} tensors changed -> {out}")


def _warn_split_words(pipe, concepts: list[str]) -> None:
    from erasekit.pipeline import word_pieces

    for c in concepts:
        for w in c.split():
            pieces = word_pieces(pipe, w)
            if len(pieces) >= 3:
                typer.secho(
                    f"warning: {w!r} is split by the tokenizer into {len(pieces)} pieces {pieces}; erasure acts on "
                    "all of them, and a near-miss spelling may escape it.",
                    fg=typer.colors.YELLOW,
                    err=True,
                )


@app.command()
def generate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (images/ + index.jsonl); resumable.")],
    prompt: Annotated[list[str] | None, typer.Option("--prompt", help="A prompt (repeatable).")] = None,
    prompts: Annotated[Path | None, typer.Option(help="A text file, one prompt per line.")] = None,
    seeds: Annotated[str, typer.Option(help="Seeds for every prompt: '0:10' or '1,5,7'.")] = "0:4",
    model: ModelOpt = "shapes",
    edit: EditOpt = None,
    steps: Annotated[int | None, typer.Option(help="Sampler steps (default: the model's).")] = None,
    guidance: Annotated[float | None, typer.Option(help="Classifier-free guidance scale.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 25,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
) -> None:
    """Generate images for prompts x seeds (deterministic per prompt and seed)."""
    from erasekit.eval.distributed import parse_seeds
    from erasekit.eval.generate import PromptItem, SamplingConfig
    from erasekit.eval.generate import generate as gen

    try:
        texts = list(prompt or [])
        if prompts is not None:
            if not prompts.exists():
                raise FileNotFoundError(f"`--prompts` file {str(prompts)!r} does not exist.")
            texts += [line.strip() for line in prompts.read_text().splitlines() if line.strip()]
        if not texts:
            raise ValueError("No prompts: pass --prompt TEXT (repeatable) or --prompts FILE.")
        seed_list = parse_seeds(seeds)
        pipe = _load(model, edit, device)
        items = [PromptItem(t, s) for t in texts for s in seed_list]
        recs = gen(pipe, items, out, SamplingConfig(steps, guidance, batch_size))
    except (ValueError, FileNotFoundError, OSError) as e:
        _fail(e)
    typer.echo(f"{len(recs)} images in {out} (index: {out / 'index.jsonl'})")


@app.command()
def evaluate(
    protocol: Annotated[str, typer.Option(help="Evaluation protocol, e.g. shapes-objects.")] = "shapes-objects",
    model: ModelOpt = "shapes",
    edit: EditOpt = None,
    erase: Annotated[list[str] | None, typer.Option("--erase", "-e", help="Erased concepts (default: the edit's).")] = None,
    n_per_class: Annotated[int, typer.Option(help="Images per class.")] = 50,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where to write images and metrics.json.")] = None,
    seed: Annotated[int, typer.Option(help="First seed of the fixed seed range.")] = 0,
) -> None:
    """Evaluate a model (optionally with an edit applied) with a named protocol."""
    from erasekit import Edit
    from erasekit.eval.protocols import evaluate as run
    from erasekit.eval.protocols import get_protocol
    from erasekit.io import write_json_atomic

    try:
        get_protocol(protocol)
        erased = _split(erase)
        if not erased and edit is not None:
            erased = Edit.load(edit).request.erase
        pipe = _load(model, edit)
        res = run(pipe, protocol, erase=erased, n_per_class=n_per_class, seed=seed, out_dir=out / "images" if out else None)
        res.update(model=model, edit=str(edit) if edit else None)
        if out:
            write_json_atomic(out / "metrics.json", res)
    except (ValueError, FileNotFoundError, OSError) as e:
        _fail(e)
    typer.echo(json.dumps({k: v for k, v in res.items() if k != "per_class"}, indent=2, default=str))


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Demo run directory.")] = Path("runs/demo"),
    concept: Annotated[str, typer.Option(help="Object to erase.")] = "triangle",
    n_per_class: Annotated[int, typer.Option(help="Images per object class and model.")] = 20,
) -> None:
    """Erase one object from the miniature with UCE, evaluate before/after, write report.html."""
    from erasekit.demo import run_demo

    try:
        run_demo(out, concept=concept, n_per_class=n_per_class)
    except (ValueError, FileNotFoundError, OSError) as e:
        _fail(e)


@app.command()
def attack(
    edit: Annotated[Path, typer.Option("--edit", help="Run directory (or edit folder) of the edit to attack.")],
    concept: Annotated[str, typer.Option(help="The erased concept to bring back, e.g. fire or triangle.")],
    attacks: Annotated[list[str] | None, typer.Option("--attacks", help="Attacks (comma-separated); default: all.")] = None,
    prompts: Annotated[Path | None, typer.Option(help="A text file of prompts to attack, one per line.")] = None,
    model: ModelOpt = "shapes",
    n_images: Annotated[int, typer.Option(help="Images per attacked prompt.")] = 1,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Resumable output directory.")] = None,
) -> None:
    """Red-team an edit: run attacks that try to bring the erased concept back; print ASR and cost."""
    from erasekit import Edit, load_pipeline
    from erasekit.attacks.asr import DEFAULT_ATTACKS, run_attacks

    try:
        texts = None
        if prompts is not None:
            if not prompts.exists():
                raise FileNotFoundError(f"`--prompts` file {str(prompts)!r} does not exist.")
            texts = [line.strip() for line in prompts.read_text().splitlines() if line.strip()]
        original = load_pipeline(model)
        edited = Edit.load(edit).apply_(load_pipeline(model))
        res = run_attacks(
            edited, original, concept, _split(attacks) or DEFAULT_ATTACKS, prompts=texts, n_images=n_images, seed=seed, out_dir=out
        )
    except (ValueError, FileNotFoundError, OSError) as e:
        _fail(e)
    typer.echo(json.dumps(res, indent=2, default=str))


# ------------------------------------------------------------------------------------------ world
@world_app.command("train")
def world_train(
    out: Annotated[Path, typer.Option(help="Where to write the pipeline folder.")] = Path("runs/world/shapes-sd"),
    workdir: Annotated[Path, typer.Option(help="Cache of data, latents and checkpoints (resumable).")] = Path("runs/world"),
    steps: Annotated[int | None, typer.Option(help="UNet + text encoder steps (default: the recipe's).")] = None,
    install: Annotated[bool, typer.Option(help="Copy the result into the package's bundled assets.")] = False,
) -> None:
    """Train the miniature VAE, then UNet + text encoder, from scratch (resumes if interrupted)."""
    from erasekit.world.build import build_pipeline, install_assets
    from erasekit.world.recipe import WorldRecipe

    recipe = WorldRecipe() if steps is None else WorldRecipe(unet_steps=steps)
    path = build_pipeline(out, workdir, recipe)
    if install:
        install_assets(pipeline_dir=path)
    typer.echo(f"pipeline written to {path}")


@world_app.command("train-detector")
def world_train_detector(
    out: Annotated[Path, typer.Option(help="Where to write the detector.")] = Path("runs/world/detector"),
    workdir: Annotated[Path, typer.Option(help="Data cache.")] = Path("runs/world"),
    install: Annotated[bool, typer.Option(help="Copy the result into the package's bundled assets.")] = False,
) -> None:
    """Train the miniature detector (object, colour, background, style, unsafe heads)."""
    from erasekit.world.build import build_detector, install_assets

    acc = build_detector(out, workdir)
    if install:
        install_assets(detector_dir=out)
    typer.echo(json.dumps({"heldout_accuracy": acc}, indent=2))


@world_app.command("check")
def world_check(
    model: ModelOpt = "shapes",
    n: Annotated[int, typer.Option(help="Images per concept.")] = 50,
    save: Annotated[bool, typer.Option(help="Store the result beside a local model's card.")] = False,
) -> None:
    """Detector accuracy on the model's own generations, per object, colour, style and unsafe phrasing."""
    from erasekit import load_pipeline
    from erasekit.pipeline import bundled_path
    from erasekit.world.build import check_world, save_check

    pipe = load_pipeline(model)
    res = check_world(pipe, n_per_concept=n)
    if save:
        save_check(bundled_path() if model == "shapes" else Path(model), res)
    typer.echo(json.dumps(res, indent=2))


@world_app.command("sample")
def world_sample(
    out: Annotated[Path, typer.Option(help="PNG file for a grid of real ShapesWorld images.")] = Path("runs/world/sample.png"),
    n: Annotated[int, typer.Option(help="Number of images.")] = 64,
    seed: Annotated[int, typer.Option(help="World seed.")] = 0,
) -> None:
    """Write a grid of real ShapesWorld images and print their captions."""
    from erasekit.report.html import image_grid
    from erasekit.world.shapes import make_example

    imgs, caps = zip(*[(img, sc.caption) for img, sc in (make_example(seed, i) for i in range(n))], strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(list(imgs), cols=8, scale=3).save(out)
    typer.echo("\n".join(caps))
    typer.echo(f"grid: {out}")


def main() -> None:  # pragma: no cover
    app(prog_name="erasekit")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

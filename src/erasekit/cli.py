"""``erasekit``: a thin command line over the Python API."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from safetensors import SafetensorError


class _App(typer.Typer):
    """A Typer app whose every command has the one error handler: a library error becomes one line
    on stderr and exit code 2 (``_fail``), never a traceback."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        register = super().command(*args, **kwargs)

        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(fn)
            def run(*a: Any, **k: Any) -> Any:
                try:
                    return fn(*a, **k)
                except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
                    raise
                except ERRORS as e:
                    _fail(e)

            register(run)
            return fn

        return deco


app = _App(
    help="Erase, hide, recover and audit concepts in text-to-image diffusion models.", no_args_is_help=True
)
world_app = _App(help="The miniature ShapesWorld: data, training, checks.", no_args_is_help=True)
app.add_typer(world_app, name="world")
analyze_app = _App(
    help="An erasure's side effects: sensitivity spectrum, concept graph, model difference.", no_args_is_help=True
)
app.add_typer(analyze_app, name="analyze")
from erasekit.study.cli import app as study_app  # noqa: E402 (the study sub-app; its commands import lazily)

app.add_typer(study_app, name="study")

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="'shapes' (bundled miniature), a diffusers folder, or a hub id.")
]
EditOpt = Annotated[Path | None, typer.Option("--edit", help="A run directory (or edit folder) whose edit to apply.")]
# memory and speed switches (erasekit.eval.runtime.configure_pipeline)
DtypeOpt = Annotated[
    str | None, typer.Option(help="float32, float16 or bfloat16 (default: float32; the edit is applied first).")
]
DeviceOpt = Annotated[
    str | None, typer.Option(help="torch device, e.g. cpu, cuda, cuda:1 (default: the GPU if any, else cpu).")
]
SlicingOpt = Annotated[
    bool, typer.Option("--attention-slicing", help="Compute attention a slice of heads at a time (less memory).")
]
NoSdpaOpt = Annotated[bool, typer.Option("--no-sdpa", help="Plain attention instead of PyTorch's fused SDPA.")]
SchedulerOpt = Annotated[str | None, typer.Option(help="Sampler: ddim, pndm or lms (default: the model's).")]
StepsOpt = Annotated[int | None, typer.Option(help="Sampler steps (default: the model's; 50 for SD).")]
GuidanceOpt = Annotated[
    float | None, typer.Option(help="Classifier-free guidance scale (default: the model's; 7.5 for SD).")
]
CategoryOpt = Annotated[list[str] | None, typer.Option(help="i2p: keep rows of this category (repeatable).")]
GuidanceFromFileOpt = Annotated[
    bool, typer.Option("--guidance-from-file", help="i2p: sample each row at its own guidance scale.")
]
LimitOpt = Annotated[int | None, typer.Option(help="i2p/coco: only the first N rows.")]
HeightOpt = Annotated[int | None, typer.Option(help="Image height (default: the model's).")]
WidthOpt = Annotated[int | None, typer.Option(help="Image width (default: the model's).")]
# concept sets of the analyses
ConceptsOpt = Annotated[list[str] | None, typer.Option("--concepts", "-c", help="Concepts (repeat or comma-separate).")]
VocabularyOpt = Annotated[
    str | None,
    typer.Option(
        help="A vocabulary: clip, shapes, wordfreq[:N], or a file with one concept per line (adds to --concepts)."
    ),
]
ClipOpt = Annotated[str, typer.Option(help="CLIP checkpoint: 'shapes' (the miniature's), a CLIP folder, or a hub id.")]

# prompt-file formats of `generate --protocol` (the --protocol choices of erasekit.eval.distributed)
PROMPT_FORMATS = ("lines", "i2p", "artists", "imagenette", "coco")
# The library's errors: each becomes one line on stderr and exit code 2, never a traceback. A
# SafetensorError (corrupt tensor file) is an Exception subclass raised by the Rust binding.
ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    OSError,
    ImportError,
    RuntimeError,
    KeyError,
    TypeError,
    SafetensorError,
)


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


def _device(device: str | None) -> str:
    """``--device``, defaulting to the GPU when there is one."""
    if device is not None:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_configured(model: str, edit: Path | None, dtype, device, attention_slicing, no_sdpa, scheduler):
    """Load ``model``, apply ``edit`` in float32, then cast/move it and pick its attention and sampler."""
    from erasekit.eval.runtime import configure_pipeline

    pipe = _load(model, edit)
    sdpa = False if no_sdpa else None
    return configure_pipeline(pipe, dtype, attention_slicing, _device(device), sdpa=sdpa, scheduler=scheduler)


def _config(cls, **values):
    """``cls(**values)`` without the options left unset (``None``): those keep the dataclass's defaults."""
    return cls(**{k: v for k, v in values.items() if v is not None})


def _record(out: Path, name: str, **options) -> None:
    """``out/<name>.json``: the command and every option, for what the API's own result files do not record."""
    from erasekit import __version__
    from erasekit.io import write_json_atomic

    write_json_atomic(out / f"{name}.json", {"command": name, **options, "erasekit_version": __version__})


def _concepts(concepts: list[str] | None, vocabulary: str | None, pipe) -> list[str]:
    """``--concepts`` then ``--vocabulary``'s words (unique, in order)."""
    from erasekit.concepts import load_vocabulary

    names = _split(concepts)
    if vocabulary is not None:
        names += load_vocabulary(vocabulary, tokenizer=pipe.tokenizer)
    if not names:
        raise ValueError("No concepts: pass --concepts a,b,c and/or --vocabulary shapes|clip|wordfreq|FILE.")
    return list(dict.fromkeys(names))


def _edits(values: list[str]) -> dict:
    """``--edit PATH`` or ``--edit LABEL=PATH`` (repeatable) -> ``{label: Edit}``; labels default to the
    edit's method, or to the folder name when two edits share a method."""
    from erasekit import Edit

    pairs = []
    for v in values:
        label, sep, path = v.partition("=")
        if not sep or Path(v).exists():
            label, path = "", v
        pairs.append((label, Path(path), Edit.load(path)))
    methods = [e.method for label, _, e in pairs if not label]
    out = {}
    for label, path, e in pairs:
        name = label or (e.method if methods.count(e.method) == 1 else path.name)
        if name in out:
            raise ValueError(f"Two edits are labelled {name!r}; name them with --edit LABEL=PATH.")
        out[name] = e
    return out


@app.command()
def methods() -> None:
    """List the erasure methods, their presets (what each changes) and their options."""
    from dataclasses import fields

    from erasekit import available_methods
    from erasekit.methods.base import field_default, preset_diff, used_when_text

    for name, spec in available_methods().items():
        typer.secho(f"{name}: {spec.summary}", bold=True)
        for pname, p in spec.presets.items():
            mark = " (default)" if pname == spec.default_preset else ""
            diff = preset_diff(name, pname)
            changes = ", ".join(f"{k}={v!r}" for k, v in diff.items()) or "the defaults below"
            typer.echo(f"  preset {pname}{mark}: {p.summary}; sets {changes}")
        for f in fields(spec.config_class):
            when = f.metadata.get("used_when")
            note = f"  [read when {used_when_text(when)}]" if when else ""
            typer.echo(f"    {f.name} = {field_default(f)!r}  {f.metadata.get('help', '')}{note}")


@app.command()
def erase(
    erase: Annotated[list[str], typer.Option("--erase", "-e", help="Concept(s) to erase (repeat or comma-separate).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to write.")],
    method: Annotated[str, typer.Option(help="Erasure method (see `erasekit methods`).")] = "uce",
    preset: Annotated[
        str | None, typer.Option(help="Method preset: paper or authors (default: the method's; `erasekit methods`).")
    ] = None,
    preserve: Annotated[list[str] | None, typer.Option("--preserve", "-p", help="Concept(s) to preserve.")] = None,
    anchor: Annotated[str | None, typer.Option(help="What erased concepts become (default: the empty prompt).")] = None,
    model: ModelOpt = "shapes",
    set_: Annotated[list[str] | None, typer.Option("--set", help="Method option KEY=VALUE (repeatable).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed for methods that sample.")] = 0,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
    overwrite: Annotated[bool, typer.Option(help="Allow writing into a non-empty run directory.")] = False,
    report: Annotated[bool, typer.Option(help="Also write RUN/report.html (before/after images, traces).")] = False,
    report_seeds: Annotated[str, typer.Option(help="Seeds of the report's before/after grids.")] = "0:6",
) -> None:
    """Erase concepts from a model and save the edit as a run directory."""
    import time
    import warnings

    import torch

    from erasekit import EraseRequest, get_method, load_pipeline
    from erasekit.methods.base import erase as erasekit_erase
    from erasekit.methods.base import make_config
    from erasekit.runs import parse_overrides, run_dir, write_run_config

    spec = get_method(method)
    if report:  # parsed before the (long) erase, so a bad value fails first
        from erasekit.eval.distributed import parse_seeds

        try:
            grid_seeds = parse_seeds(report_seeds)
        except ValueError as e:
            raise ValueError(str(e).replace("`--seeds", "`--report-seeds")) from None
    request = EraseRequest(_split(erase), _split(preserve), anchor)
    overrides = parse_overrides(spec.config_class, set_ or [])
    config = make_config(method, preset, **overrides)
    if getattr(config, "key_dir", None):  # hiding: the secret key must not be lost nor shipped
        from erasekit.methods.hide import check_key_dir

        check_key_dir(config.key_dir, out)
    pipe = load_pipeline(model, device=device)
    _warn_split_words(pipe, request.erase + request.preserve)
    with run_dir(out, overwrite=overwrite) as d:
        t0 = time.time()
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            edit = erasekit_erase(
                pipe, request, method, config, generator=torch.Generator().manual_seed(seed), progress=True
            )
        seconds = time.time() - t0
        edit.save(d)
        write_run_config(
            d,
            method=method,
            config=edit.config,
            request=edit.metadata()["request"],
            base=edit.base,
            seed=seed,
            seconds=seconds,
        )
    if report:
        from erasekit.report.run_report import build_run_report

        page = build_run_report(out, pipe=pipe, seeds=grid_seeds)
    typer.echo(f"{method} erased {request.erase} in {seconds:.2f} s; {len(edit.tensors)} tensors changed -> {out}")
    if report:
        typer.echo(f"report: {page}")


@app.command("report")
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
        Path | None, typer.Option("--out", "-o", help="Where to write the page (default: RUN/report.html).")
    ] = None,
) -> None:
    """Write one self-contained HTML report of an erase run (request, config, before/after, metrics, traces, spectra)."""
    from erasekit.eval.distributed import parse_seeds
    from erasekit.eval.generate import SamplingConfig
    from erasekit.report.run_report import build_run_report

    sampling = SamplingConfig(steps, guidance) if steps is not None or guidance is not None else None
    page = build_run_report(
        run,
        model=model,
        seeds=parse_seeds(seeds),
        preserve=_split(preserve) or None,
        sampling=sampling,
        prompt_template=prompt_template,
        recovery_key=recovery_key,
        rece_model=rece_model,
        out=out,
    )
    typer.echo(f"report: {page}")


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
    prompts: Annotated[Path | None, typer.Option(help="A prompt file in the --protocol's format.")] = None,
    protocol: Annotated[
        str, typer.Option(help="Prompt-file format: lines (one prompt per line), i2p, artists, imagenette, coco.")
    ] = "lines",
    seeds: Annotated[str, typer.Option(help="lines / --prompt: seeds for every prompt, '0:10' or '1,5,7'.")] = "0:4",
    model: ModelOpt = "shapes",
    edit: EditOpt = None,
    recovery_key: Annotated[
        Path | None, typer.Option(help="A recovery key (erasekit recover / method hide) of --edit: generate with it.")
    ] = None,
    category: CategoryOpt = None,
    guidance_from_file: GuidanceFromFileOpt = False,
    limit: LimitOpt = None,
    n_samples: Annotated[int, typer.Option(help="artists: images per prompt (seeds evaluation_seed + j).")] = 5,
    n_per_class: Annotated[int, typer.Option(help="imagenette without --prompts: images per class.")] = 500,
    classes: Annotated[str | None, typer.Option(help="imagenette: comma-separated classes (default: all 10).")] = None,
    seed: Annotated[int, typer.Option(help="imagenette/coco: first seed when the file has none.")] = 0,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch (per process).")] = 25,
    height: HeightOpt = None,
    width: WidthOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    attention_slicing: SlicingOpt = False,
    no_sdpa: NoSdpaOpt = False,
    scheduler: SchedulerOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Generate images for prompts x seeds, or for a protocol's prompt file (resumable).

    Each image depends only on its prompt and seed. Under `accelerate launch -m erasekit generate ...` the
    prompts are sharded over the processes and their indexes merged into one index.jsonl
    (erasekit.eval.distributed). With --recovery-key the edited model is conditioned through the key."""
    from types import SimpleNamespace

    from erasekit.eval.distributed import items_from_args, launch_generation, parse_seeds
    from erasekit.eval.generate import PromptItem, SamplingConfig

    if protocol not in PROMPT_FORMATS:
        raise ValueError(
            f"Unknown --protocol {protocol!r} for generate; choose one of {', '.join(PROMPT_FORMATS)}."
        )
    items: list[PromptItem] = []
    if prompts is not None or protocol != "lines":  # the file reader (imagenette also runs without a file)
        args = SimpleNamespace(
            protocol=protocol,
            prompts=prompts,
            seeds=seeds,
            category=_split(category) or None,
            guidance_from_file=guidance_from_file,
            limit=limit,
            n_samples=n_samples,
            n_per_class=n_per_class,
            classes=classes,
            seed=seed,
        )
        items = items_from_args(args)
    if prompt:
        if protocol != "lines":
            raise ValueError(f"--prompt goes with --protocol lines (the default), not {protocol!r}.")
        items += [PromptItem(t, s) for t in prompt for s in parse_seeds(seeds)]
    if not items:
        raise ValueError(f"No prompts: pass --prompt TEXT (repeatable) or --prompts FILE (--protocol {protocol}).")
    sampling = SamplingConfig(steps, guidance, batch_size, height, width)
    runtime = dict(
        dtype=dtype, device=device, attention_slicing=attention_slicing, no_sdpa=no_sdpa, scheduler=scheduler
    )
    extra = {"command": "generate", "protocol": protocol, "prompts": str(prompts.resolve()) if prompts else None}
    if recovery_key is None:
        records = launch_generation(
            model,
            items,
            out,
            sampling,
            edit=edit,
            dtype=dtype,
            device=device,
            attention_slicing=attention_slicing,
            sdpa=False if no_sdpa else None,
            scheduler=scheduler,
            progress=not quiet,
            extra=extra,
        )
    else:
        records = _generate_with_key(model, edit, recovery_key, items, out, sampling, runtime, not quiet, extra)
    if records is not None:  # rank 0 (or the only process)
        typer.echo(f"{len(records)} images in {out} (index: {out / 'index.jsonl'})")


def _generate_with_key(model, edit, key_path, items, out: Path, sampling, runtime: dict, progress: bool, extra: dict):
    """One process: the edited model, conditioned through the recovery key's soft tokens
    (:meth:`erasekit.methods.hide.RecoveryKey.prompt_embeds`); ``launch.json`` records the key's identity."""
    import datetime as dt
    import os
    from dataclasses import asdict

    from erasekit import Edit, load_pipeline
    from erasekit.eval.generate import generate as gen
    from erasekit.eval.runtime import configure_pipeline, runtime_info
    from erasekit.io import file_digest, write_json_atomic
    from erasekit.methods.hide import KEY_TENSORS, RecoveryKey
    from erasekit.pipeline import base_info

    if edit is None:
        raise ValueError("--recovery-key needs --edit: the edit the key was made for (the key is checked against it).")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("Generation with --recovery-key runs in one process; run it without `accelerate launch`.")
    if any(it.meta.get("guidance_scale") is not None for it in items):
        raise ValueError("--guidance-from-file cannot be combined with --recovery-key (one guidance scale for all).")
    pipe = load_pipeline(model)
    the_edit = Edit.load(edit)
    key = RecoveryKey.load(key_path, edit=the_edit, pipe=pipe)  # refuses a key made for another edit or base
    the_edit.apply_(pipe)
    sdpa = False if runtime["no_sdpa"] else None
    configure_pipeline(
        pipe,
        runtime["dtype"],
        runtime["attention_slicing"],
        _device(runtime["device"]),
        sdpa=sdpa,
        scheduler=runtime["scheduler"],
    )
    conditioning = {
        "recovery_key": {
            "concepts": key.concepts,
            "edit_digest": key.edit_digest,
            "tensors_sha256": file_digest(Path(key_path) / KEY_TENSORS, 16),
        }
    }
    records = gen(
        pipe,
        items,
        out,
        sampling,
        progress=progress,
        prompt_embeds_fn=lambda prompts: key.prompt_embeds(pipe, prompts),
        conditioning=conditioning,
    )
    write_json_atomic(
        out / "launch.json",
        {
            **extra,
            **conditioning,
            "model": base_info(pipe),
            "edit": str(edit),
            "sampling": asdict(sampling.resolved(pipe)),
            "runtime": runtime_info(pipe),
            "processes": 1,
            "images": len({(r["prompt"], r["seed"]) for r in records}),
            "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        },
    )
    return records


@app.command()
def evaluate(
    protocol: Annotated[
        str, typer.Option(help="Evaluation protocol: shapes-objects, imagenette, i2p, artists, coco.")
    ] = "shapes-objects",
    model: ModelOpt = "shapes",
    edit: EditOpt = None,
    erase: Annotated[
        list[str] | None, typer.Option("--erase", "-e", help="Erased concepts (default: the edit's).")
    ] = None,
    preserve: Annotated[
        list[str] | None, typer.Option("--preserve", "-p", help="Preserved classes (default: all the others).")
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option(help="The protocol's prompt file (see docs/reproducing-sd14.md).")
    ] = None,
    n_per_class: Annotated[
        int | None, typer.Option(help="Images per class (shapes-objects: 50; imagenette: 500).")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="First seed of the fixed seed range (when the file gives none).")
    ] = None,
    category: CategoryOpt = None,
    guidance_from_file: GuidanceFromFileOpt = False,
    limit: LimitOpt = None,
    n_samples: Annotated[int | None, typer.Option(help="artists: images per prompt (default 5).")] = None,
    reference_model: Annotated[
        str | None, typer.Option(help="artists/coco: the original model, for LPIPS / FID (images go to OUT/reference).")
    ] = None,
    reference_dir: Annotated[
        Path | None, typer.Option(help="artists/coco: the original model's images, or where to generate them.")
    ] = None,
    reference_images: Annotated[Path | None, typer.Option(help="coco: a folder of real images for FID.")] = None,
    clip: Annotated[
        str | None, typer.Option(help="artists/coco: CLIP checkpoint (a folder or hub id) for the CLIP score.")
    ] = None,
    no_lpips: Annotated[bool, typer.Option("--no-lpips", help="artists: skip LPIPS.")] = False,
    no_fid: Annotated[bool, typer.Option("--no-fid", help="coco: skip FID.")] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where to write images and metrics.json.")] = None,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 25,
    height: HeightOpt = None,
    width: WidthOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    attention_slicing: SlicingOpt = False,
    no_sdpa: NoSdpaOpt = False,
    scheduler: SchedulerOpt = None,
) -> None:
    """Evaluate a model (optionally with an edit applied) with a named protocol; write metrics.json.

    Real-model protocols (imagenette, i2p, artists, coco) take --out as their run directory and reuse the
    images already there (e.g. from `accelerate launch -m erasekit generate ...` with the same options)."""
    import inspect
    from dataclasses import asdict

    from erasekit import Edit, load_pipeline
    from erasekit.eval import real_protocols
    from erasekit.eval.generate import SamplingConfig
    from erasekit.eval.protocols import evaluate as run
    from erasekit.eval.protocols import get_protocol
    from erasekit.eval.runtime import configure_pipeline, runtime_info
    from erasekit.io import write_json_atomic

    fn = get_protocol(protocol)
    accepts = inspect.signature(fn).parameters
    own_metrics = fn.__module__ == real_protocols.__name__  # these write out/metrics.json themselves
    options = {  # protocol keyword -> (flag, value or None when not given)
        "preserve": ("--preserve", _split(preserve) or None),
        "prompts": ("--prompts", prompts),
        "n_per_class": ("--n-per-class", n_per_class),
        "seed": ("--seed", seed),
        "categories": ("--category", _split(category) or None),
        "guidance_from_file": ("--guidance-from-file", guidance_from_file or None),
        "limit": ("--limit", limit),
        "n_samples": ("--n-samples", n_samples),
        "reference": ("--reference-model", reference_model),
        "reference_dir": ("--reference-dir", reference_dir),
        "reference_images": ("--reference-images", reference_images),
        "clip": ("--clip", clip),
        "lpips": ("--no-lpips", True if no_lpips else None),
        "features": ("--no-fid", True if no_fid else None),
        "erase": ("--erase", _split(erase) or None),
    }
    for name, (flag, value) in options.items():
        if value is not None and name not in accepts:
            raise ValueError(f"{flag} does not apply to protocol {protocol!r}.")
    kwargs = {name: value for name, (_, value) in options.items() if value is not None}
    if "erase" in accepts and "erase" not in kwargs and edit is not None:
        kwargs["erase"] = Edit.load(edit).request.erase
    for name in ("lpips", "features"):  # --no-lpips / --no-fid
        if kwargs.pop(name, None):
            kwargs[name] = None
    dev = _device(device)
    if "device" in accepts:  # where the protocol's scorers run
        kwargs["device"] = dev
    pipe = _load_configured(model, edit, dtype, device, attention_slicing, no_sdpa, scheduler)
    if reference_model is not None:
        ref = load_pipeline(reference_model)
        sdpa = False if no_sdpa else None
        kwargs["reference"] = configure_pipeline(ref, dtype, attention_slicing, dev, sdpa=sdpa, scheduler=scheduler)
    sampling = SamplingConfig(steps, guidance, batch_size, height, width)
    out_dir = out if own_metrics else (out / "images" if out else None)
    res = run(pipe, protocol, out_dir=out_dir, sampling=sampling, **kwargs)
    if out:
        recorded = {k: v for k, v in kwargs.items() if k != "reference"}
        _record(
            out,
            "evaluate",
            protocol=protocol,
            model=model,
            edit=str(edit) if edit else None,
            reference_model=reference_model,
            options=recorded,
            sampling=asdict(sampling.resolved(pipe)),
            runtime=runtime_info(pipe),
        )
    if not own_metrics:
        res.update(model=model, edit=str(edit) if edit else None)
        if out:
            write_json_atomic(out / "metrics.json", res)
    typer.echo(
        json.dumps({k: v for k, v in res.items() if k not in ("per_class", "per_artist")}, indent=2, default=str)
    )


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Demo run directory.")] = Path("runs/demo"),
    concept: Annotated[str, typer.Option(help="Object to erase.")] = "triangle",
    n_per_class: Annotated[int, typer.Option(help="Images per object class and model.")] = 20,
) -> None:
    """Erase one object from the miniature with UCE, evaluate before/after, write report.html."""
    from erasekit.demo import run_demo

    run_demo(out, concept=concept, n_per_class=n_per_class)


@app.command()
def attack(
    edit: Annotated[Path, typer.Option("--edit", help="Run directory (or edit folder) of the edit to attack.")],
    concept: Annotated[str, typer.Option(help="The erased concept to bring back, e.g. fire or triangle.")],
    attacks: Annotated[
        list[str] | None, typer.Option("--attacks", help="Attacks (comma-separated); default: all.")
    ] = None,
    prompts: Annotated[Path | None, typer.Option(help="A text file of prompts to attack, one per line.")] = None,
    model: ModelOpt = "shapes",
    n_images: Annotated[int, typer.Option(help="Images per attacked prompt.")] = 1,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Resumable output directory.")] = None,
) -> None:
    """Red-team an edit: run attacks that try to bring the erased concept back; print ASR and cost."""
    from erasekit import Edit, load_pipeline
    from erasekit.attacks.asr import DEFAULT_ATTACKS, run_attacks

    texts = None
    if prompts is not None:
        if not prompts.exists():
            raise FileNotFoundError(f"`--prompts` file {str(prompts)!r} does not exist.")
        texts = [line.strip() for line in prompts.read_text().splitlines() if line.strip()]
    original = load_pipeline(model)
    edited = Edit.load(edit).apply_(load_pipeline(model))
    res = run_attacks(
        edited,
        original,
        concept,
        _split(attacks) or DEFAULT_ATTACKS,
        prompts=texts,
        n_images=n_images,
        seed=seed,
        out_dir=out,
    )
    typer.echo(json.dumps(res, indent=2, default=str))


@app.command()
def recover(
    edit: Annotated[
        Path, typer.Option("--edit", help="Run directory (or edit folder) of the edit that hides the concept.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the recovery key (outside the edit's folder).")],
    concept: Annotated[
        list[str] | None,
        typer.Option("--concept", help="Hidden concept(s) to recover (default: the edit's erased ones)."),
    ] = None,
    model: ModelOpt = "shapes",
    rho: Annotated[
        float | None, typer.Option(help="Radius of the L2 ball around the concept's embedding (1.0).")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Optimisation steps (200).")] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate of the prompt (0.01).")] = None,
    n_tokens: Annotated[
        int | None, typer.Option(help="Soft tokens of a new prompt (4; an --init key keeps its own).")
    ] = None,
    ddim_steps: Annotated[int | None, typer.Option(help="DDIM steps of the sampler that produces z_t (50).")] = None,
    start_guidance: Annotated[
        float | None, typer.Option(help="CFG scale of the sampler that produces z_t (3.0).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of every random draw (0).")] = None,
    init: Annotated[
        Path | None, typer.Option(help="Start from this recovery key's prompts (projected into the ball).")
    ] = None,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a recovery key already in --out.")] = False,
) -> None:
    """Recover a hidden concept's prompt from an edit (knowledge hiding stage 2, slides eq. 16).

    Projected gradient descent on soft tokens within an L2 ball of radius rho around the concept's
    embedding; the recovery key is saved in --out, apart from the edit."""
    from dataclasses import asdict, replace

    from erasekit import Edit, load_pipeline
    from erasekit.methods.hide import KEY_META, RecoverConfig, RecoveryKey
    from erasekit.methods.hide import recover as run

    cfg = _config(
        RecoverConfig,
        rho=rho,
        epochs=steps,
        lr=lr,
        n_tokens=n_tokens,
        ddim_steps=ddim_steps,
        start_guidance=start_guidance,
        seed=seed,
    )
    edit_dir, key_dir = edit.resolve(), out.resolve()
    if key_dir == edit_dir or edit_dir in key_dir.parents:
        raise ValueError(
            f"--out {str(out)!r} is inside the edit's folder; the recovery key is a secret: keep it apart from the edit."
        )
    if (out / KEY_META).exists() and not overwrite:
        raise FileExistsError(
            f"{str(out)!r} already holds a recovery key; pass --overwrite or choose another --out."
        )
    the_edit = Edit.load(edit)
    pipe = load_pipeline(model, device=device)
    start = RecoveryKey.load(init, edit=the_edit, pipe=pipe) if init is not None else None
    key = run(pipe, the_edit, cfg, concepts=_split(concept) or None, init=start)
    config = {"recover": asdict(cfg), "edit": str(edit), "model": model, "init": str(init) if init else None}
    key = replace(key, meta={**key.meta, "config": config})
    key.save(out)
    dist = key.meta["distance_from_concept"]
    typer.echo(f"recovery key for {key.concepts} -> {out} (final loss {key.meta['final_loss']}, distance {dist})")


# ------------------------------------------------------------------------------------------ analyze
@analyze_app.command("spectrum")
def analyze_spectrum(
    edit: Annotated[list[str], typer.Option("--edit", help="An edit to analyse: PATH or LABEL=PATH (repeatable).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for spectrum-*.json, the plots and spectrum.html.")],
    concepts: ConceptsOpt = None,
    vocabulary: VocabularyOpt = None,
    model: ModelOpt = "shapes",
    clip: ClipOpt = "shapes",
    n_seeds: Annotated[int | None, typer.Option("--n-seeds", "-k", help="k: images per concept and model (8).")] = None,
    first_seed: Annotated[int | None, typer.Option(help="Seeds are first_seed .. first_seed + k - 1 (0).")] = None,
    prompt_template: Annotated[
        str | None, typer.Option(help="Generation prompt of a concept; '{}' is the concept.")
    ] = None,
    score_template: Annotated[str | None, typer.Option(help="Text CLIP scores against (default: the prompt).")] = None,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per batch (25).")] = None,
    top: Annotated[int, typer.Option(help="Concepts shown at each end of the bar chart.")] = 20,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
) -> None:
    """Concept-sensitivity spectrum of each edit (AP paper sec. 3.2): delta(c) = mean CLIP(original, c) - CLIP(edited, c)."""
    from erasekit import load_pipeline
    from erasekit.analysis import ClipScorer, SpectrumConfig, run_spectra
    from erasekit.analysis.spectrum import json_safe

    cfg = _config(
        SpectrumConfig,
        n_seeds=n_seeds,
        first_seed=first_seed,
        prompt_template=prompt_template,
        score_template=score_template,
        steps=steps,
        guidance_scale=guidance,
        batch_size=batch_size,
    )
    edits = _edits(edit)
    pipe = load_pipeline(model, device=device)
    names = _concepts(concepts, vocabulary, pipe)
    scorer = ClipScorer.from_pretrained(clip, device=device)
    spectra = run_spectra(pipe, edits, names, scorer, cfg, out, top=top)
    _record(
        out, "analyze-spectrum", model=model, edits=edit, clip=clip, vocabulary=vocabulary, concepts=names, top=top
    )
    summary = {label: s.summary() for label, s in spectra.items()}
    typer.echo(json.dumps(json_safe(summary), indent=2))
    typer.echo(f"spectra, plots and spectrum.html in {out}")


@analyze_app.command("graph")
def analyze_graph(
    edit: Annotated[
        list[str], typer.Option("--edit", help="An erasure of the graph: PATH or LABEL=PATH (repeatable).")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for graph.json, the heatmap, graph.html and spectra.")
    ],
    concepts: ConceptsOpt = None,
    vocabulary: VocabularyOpt = None,
    model: ModelOpt = "shapes",
    clip: ClipOpt = "shapes",
    distance: Annotated[
        str, typer.Option(help="Text space of the distances d(c_i, c_e): clip or text-encoder (the model's).")
    ] = "clip",
    quantile: Annotated[
        float, typer.Option(help="Quantile that defines abnormal concepts (low G_0, high impact).")
    ] = 0.25,
    n_seeds: Annotated[int | None, typer.Option("--n-seeds", "-k", help="k: images per concept and model (8).")] = None,
    first_seed: Annotated[int | None, typer.Option(help="Seeds are first_seed .. first_seed + k - 1 (0).")] = None,
    prompt_template: Annotated[
        str | None, typer.Option(help="Generation prompt of a concept; '{}' is the concept.")
    ] = None,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per batch (25).")] = None,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
) -> None:
    """Concept graph of several erasures (slides, "The Concept Graph").

    The impact matrix Delta_ce(c_i) (one spectrum per edit) and its locality, asymmetry and abnormal concepts."""
    from erasekit import load_pipeline
    from erasekit.analysis import ClipScorer, SpectrumConfig, run_graph
    from erasekit.analysis.spectrum import json_safe

    if distance not in ("clip", "text-encoder"):
        raise ValueError(f"--distance must be clip or text-encoder, got {distance!r}.")
    if not 0 < quantile < 1:
        raise ValueError(f"--quantile must be in (0, 1), got {quantile}.")
    cfg = _config(
        SpectrumConfig,
        n_seeds=n_seeds,
        first_seed=first_seed,
        prompt_template=prompt_template,
        steps=steps,
        guidance_scale=guidance,
        batch_size=batch_size,
    )
    edits = _edits(edit)
    pipe = load_pipeline(model, device=device)
    names = _concepts(concepts, vocabulary, pipe)
    scorer = ClipScorer.from_pretrained(clip, device=device)
    source = pipe if distance == "text-encoder" else None
    graph, dist = run_graph(pipe, edits, names, scorer, cfg, out, distance_source=source, quantile=quantile)
    _record(
        out,
        "analyze-graph",
        model=model,
        edits=edit,
        clip=clip,
        distance=distance,
        quantile=quantile,
        concepts=names,
    )
    typer.echo(json.dumps(json_safe(graph.properties(dist, quantile)), indent=2, default=str))
    typer.echo(f"graph.json, graph_heatmap.png and graph.html in {out}")


@analyze_app.command("diff")
def analyze_diff(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for diff.json, diff.png and diff.html.")],
    edit: Annotated[Path | None, typer.Option("--edit", help="The edit of --model to inspect.")] = None,
    edited_model: Annotated[
        str | None, typer.Option(help="Or a whole fine-tuned pipeline (folder or hub id) to compare with --model.")
    ] = None,
    concepts: ConceptsOpt = None,
    vocabulary: VocabularyOpt = None,
    model: ModelOpt = "shapes",
    lam: Annotated[float | None, typer.Option(help="lambda of eq. 19: weight of the change of c_t (1.0).")] = None,
    changed: Annotated[
        str | None, typer.Option(help="c_e, the changed concept (default: the edit's first erased).")
    ] = None,
    n_samples: Annotated[int | None, typer.Option(help="(z_t, t) samples the losses are averaged over (4).")] = None,
    first_seed: Annotated[int | None, typer.Option(help="Sample j starts from seed first_seed + j (0).")] = None,
    ddim_steps: Annotated[int | None, typer.Option(help="DDIM steps for sampling z_t (default: the model's).")] = None,
    latent_guidance: Annotated[float | None, typer.Option(help="CFG scale while sampling z_t (3.0).")] = None,
    latents: Annotated[str | None, typer.Option(help="z_t sampled on c_e for all ('changed') or per concept.")] = None,
    prompt_template: Annotated[str | None, typer.Option(help="Prompt of a concept; '{}' is the concept.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Concepts per UNet batch (16).")] = None,
    top: Annotated[int, typer.Option(help="Concepts listed and shown with images.")] = 10,
    image_seeds: Annotated[
        str, typer.Option(help="Seeds of the top concepts' images, '0:4' or '1,5'; '' for none.")
    ] = "0:4",
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
) -> None:
    """Model-difference inspection (slides eq. 19): the concepts of an inspection space a fine-tune changed most."""
    from erasekit import Edit, load_pipeline
    from erasekit.analysis import DiffConfig, run_diff
    from erasekit.eval.distributed import parse_seeds
    from erasekit.eval.generate import SamplingConfig

    if (edit is None) == (edited_model is None):
        raise ValueError("Pass exactly one of --edit (an edit of --model) and --edited-model (a second pipeline).")
    cfg = _config(
        DiffConfig,
        lam=lam,
        changed=changed,
        n_samples=n_samples,
        first_seed=first_seed,
        ddim_steps=ddim_steps,
        guidance_scale=latent_guidance,
        latents=latents,
        prompt_template=prompt_template,
        batch_size=batch_size,
    )
    seeds = parse_seeds(image_seeds) if image_seeds.strip() else []
    edited = Edit.load(edit) if edit is not None else load_pipeline(edited_model, device=device)
    pipe = load_pipeline(model, device=device)
    space = _concepts(concepts, vocabulary, pipe)
    result = run_diff(
        pipe, edited, space, cfg, out, top=top, image_seeds=seeds, sampling=SamplingConfig(steps, guidance)
    )
    _record(
        out,
        "analyze-diff",
        model=model,
        edit=str(edit) if edit else None,
        edited_model=edited_model,
        concepts=space,
        top=top,
        image_seeds=seeds,
        sampling={"steps": steps, "guidance_scale": guidance},
    )
    for e in result.top(top, include_changed=True):
        l1 = "-" if e.l1 is None else f"{e.l1:.4g}"
        typer.echo(
            f"{e.objective:10.4g}  L1 {l1:>10}  L2 {e.l2:10.4g}  {e.concept}{'  (changed)' if e.is_changed else ''}"
        )
    typer.echo(f"diff.json, diff.png and diff.html in {out}")


# ------------------------------------------------------------------------------------------ world
@world_app.command("train")
def world_train(
    out: Annotated[Path, typer.Option(help="Where to write the pipeline folder.")] = Path("runs/world/shapes-sd"),
    workdir: Annotated[Path, typer.Option(help="Cache of data, latents and checkpoints (resumable).")] = Path(
        "runs/world"
    ),
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


@world_app.command("train-clip")
def world_train_clip(
    out: Annotated[Path, typer.Option(help="Where to write the CLIP folder.")] = Path("runs/world/shapes-clip"),
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (default: the recipe's).")] = None,
    workdir: Annotated[Path, typer.Option(help="Data cache and resumable checkpoints.")] = Path("runs/world"),
    set_: Annotated[list[str] | None, typer.Option("--set", help="Recipe option KEY=VALUE (repeatable).")] = None,
) -> None:
    """Train the miniature CLIP contrastively on ShapesWorld (resumes if interrupted); print its zero-shot accuracy."""
    from erasekit.runs import parse_overrides
    from erasekit.world.clip import ClipRecipe, train_clip

    recipe = ClipRecipe(**parse_overrides(ClipRecipe, set_ or []))
    meta = train_clip(out, steps, workdir=workdir, recipe=recipe)
    typer.echo(json.dumps({"zero_shot": meta["zero_shot"], "parameters": meta["parameters"]}, indent=2))
    typer.echo(f"CLIP written to {out} (use it with --clip {out})")


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
    out: Annotated[Path, typer.Option(help="PNG file for a grid of real ShapesWorld images.")] = Path(
        "runs/world/sample.png"
    ),
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


# ------------------------------------------------------------------------------------------ export
@app.command("export")
def export_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory (or edit folder) of `erasekit erase --out`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Export directory (must not exist or be empty).")],
    format: Annotated[str, typer.Option("--format", "-f", help="diffusers, lora, kohya or unet.")] = "diffusers",
    model: Annotated[str | None, typer.Option("--model", "-m", help="Base model (default: the edit's own).")] = None,
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
    from erasekit import Edit, load_pipeline
    from erasekit.export import format_report
    from erasekit.export import push_to_hub as push
    from erasekit.pipeline import BUNDLED

    edit = Edit.load(run)
    base = model or (
        edit.base.get("id") if edit.base.get("id") in BUNDLED else edit.base.get("path") or edit.base.get("id")
    )
    if rank is not None and rank != "full":
        if not rank.isdigit():
            raise ValueError(f"`--rank` must be a positive integer or 'full', got {rank!r}.")
        rank_value: int | str | None = int(rank)
    else:
        rank_value = rank
    pipe = load_pipeline(base)
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


@app.command()
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


def main() -> None:  # pragma: no cover
    app(prog_name="erasekit")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

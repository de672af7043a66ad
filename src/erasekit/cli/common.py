"""What every command group shares: the error handler, the option types, small helpers."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any

import click
import torch
import typer
from safetensors import SafetensorError

from erasekit import Edit, __version__, load_pipeline
from erasekit.concepts import load_vocabulary
from erasekit.eval.runtime import configure_pipeline, default_device
from erasekit.io import write_json_atomic
from erasekit.pipeline import check_device, check_dtype, denoiser, word_pieces


class App(typer.Typer):
    """A Typer app whose every command has the one error handler: a library error becomes one line
    on stderr and exit code 2 (:func:`fail`), never a traceback."""

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
                    fail(e)

            register(run)
            return fn

        return deco


def out_dir(value: str | Path) -> Path:
    """Parse an ``--out`` value: an empty one (an unset shell variable) is refused, not read as the
    current directory, which would fill the working tree with a run's files. Typer >= 0.29 also
    passes an option's default (a ``Path``) through this parser."""
    if not str(value).strip():
        raise typer.BadParameter("is empty: name a directory, e.g. --out runs/NAME")
    return Path(value)


ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="'shapes' (bundled miniature), a diffusers folder, or a hub id.")
]

RevisionOpt = Annotated[
    str | None,
    typer.Option(
        "--revision", help="Hub model: the branch, tag or commit of --model to load (default: main; not for a folder)."
    ),
]

EditOpt = Annotated[Path | None, typer.Option("--edit", help="A run directory (or edit folder) whose edit to apply.")]
# memory and speed switches (erasekit.eval.runtime.configure_pipeline)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

DtypeOpt = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        help="Weight dtype: float32, float16 or bfloat16 (default: float32; an --edit is applied before the cast).",
    ),
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


def split_list(values: list[str] | None) -> list[str]:
    """Repeated options and comma-separated lists, flattened."""
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def dtype_of(value: str | torch.dtype | None) -> torch.dtype | None:
    """A ``--dtype`` value (``float32``, ``float16``, ``bfloat16``) as a torch dtype; ``None`` stays ``None``."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise ValueError(f"`--dtype {value}` is not a weight dtype EraseKit runs; use float32, float16 or bfloat16.")
    return DTYPES[value]


def check_runtime(dtype: str | None, device: str | None) -> tuple[torch.dtype | None, torch.device]:
    """``--dtype`` and ``--device`` parsed and checked together (a dtype the device cannot run is refused),
    before anything is loaded or written."""
    dt, dev = dtype_of(dtype), check_device(default_device(device))
    check_dtype(dt, dev)
    return dt, dev


def load_model(
    model: str,
    edit: Path | Edit | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = "cpu",
    revision: str | None = None,
    for_edits: Iterable[Edit] = (),
):
    """Load ``model`` (at ``revision``, a hub id's branch, tag or commit) on ``device`` in ``dtype``, with
    ``edit`` applied.

    An edit's base fingerprint is taken at the dtype it was made at (float32 unless ``erase --dtype``
    made it), so the model is loaded at that dtype, ``edit`` is applied, and only then is the pipeline
    cast to ``dtype``; ``for_edits`` are edits the caller applies later (their dtype counts the same
    way). Without edits the model is loaded in ``dtype`` directly. A dtype the device cannot run is
    refused before anything is loaded.
    """
    dt = dtype_of(dtype)
    dev = check_device(default_device(None if device is None else str(device)))
    check_dtype(dt, dev)
    the_edit = edit if edit is None or isinstance(edit, Edit) else Edit.load(edit)
    edits = [e for e in (the_edit, *for_edits) if e is not None]
    if not edits:
        return load_pipeline(model, device=dev, dtype=dt, revision=revision)
    made_at = {dtype_of(e.base.get("dtype")) or torch.float32 for e in edits}
    if len(made_at) > 1:
        raise ValueError(
            f"The edits were made at different dtypes ({', '.join(sorted(str(d) for d in made_at))}); "
            "analyse edits of one dtype together."
        )
    base_dtype = made_at.pop()
    pipe = load_pipeline(
        model, device=dev, dtype=None if base_dtype == torch.float32 else base_dtype, revision=revision
    )
    if the_edit is not None:
        the_edit.apply_(pipe)
    if dt is not None and denoiser(pipe).dtype != dt:
        configure_pipeline(pipe, dt)  # the base info keeps the fingerprint the edits are checked against
    return pipe


def load_configured(
    model: str, edit: Path | None, dtype, device, attention_slicing, no_sdpa, scheduler, revision: str | None = None
):
    """Load ``model``, apply ``edit`` at its own dtype (:func:`load_model`), then cast/move it and pick its
    attention and sampler."""
    dt, dev = check_runtime(dtype, device)
    pipe = load_model(model, edit, device="cpu", revision=revision)
    sdpa = False if no_sdpa else None
    return configure_pipeline(pipe, dt, attention_slicing, dev, sdpa=sdpa, scheduler=scheduler)


def config_from(cls, **values):
    """``cls(**values)`` without the options left unset (``None``): those keep the dataclass's defaults."""
    return cls(**{k: v for k, v in values.items() if v is not None})


def record(out: Path, name: str, **options) -> None:
    """``out/<name>.json``: the command and every option, for what the API's own result files do not record."""
    write_json_atomic(out / f"{name}.json", {"command": name, **options, "erasekit_version": __version__})


def concepts_from(concepts: list[str] | None, vocabulary: str | None, pipe) -> list[str]:
    """``--concepts`` then ``--vocabulary``'s words (unique, in order)."""
    names = split_list(concepts)
    if vocabulary is not None:
        names += load_vocabulary(vocabulary, tokenizer=pipe.tokenizer)
    if not names:
        raise ValueError("No concepts: pass --concepts a,b,c and/or --vocabulary shapes|clip|wordfreq|FILE.")
    return list(dict.fromkeys(names))


def edits_from(values: list[str]) -> dict:
    """``--edit PATH`` or ``--edit LABEL=PATH`` (repeatable) -> ``{label: Edit}``; labels default to the
    edit's method, or to the folder name when two edits share a method."""
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


def warn_split_words(pipe, concepts: list[str]) -> None:

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

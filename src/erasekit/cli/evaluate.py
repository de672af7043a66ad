"""`evaluate`: a named protocol on a model, with an edit applied."""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from erasekit import Edit, load_pipeline
from erasekit.cli.common import (
    CategoryOpt,
    DeviceOpt,
    DtypeOpt,
    EditOpt,
    GuidanceFromFileOpt,
    GuidanceOpt,
    HeightOpt,
    LimitOpt,
    ModelOpt,
    NoSdpaOpt,
    RevisionOpt,
    SchedulerOpt,
    SlicingOpt,
    StepsOpt,
    WidthOpt,
    check_runtime,
    load_configured,
    record,
    split_list,
)
from erasekit.eval.generate import SamplingConfig
from erasekit.eval.protocols import evaluate as run
from erasekit.eval.protocols import get_protocol
from erasekit.eval.registry import writes_metrics
from erasekit.eval.runtime import configure_pipeline, default_device, runtime_info
from erasekit.io import write_json_atomic
from erasekit.rundir import RunDir


def evaluate(
    protocol: Annotated[
        str, typer.Option(help="Evaluation protocol: shapes-objects, imagenette, i2p, artists, coco.")
    ] = "shapes-objects",
    model: ModelOpt = "shapes",
    revision: RevisionOpt = None,
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
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Where to write images and metrics.json (default with --edit RUN: RUN/eval/PROTOCOL; else none).",
        ),
    ] = None,
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
    fn = get_protocol(protocol)
    accepts = inspect.signature(fn).parameters
    own_metrics = writes_metrics(protocol)  # these write out/metrics.json themselves
    run_dir = RunDir.open(edit) if out is None and edit is not None and RunDir.is_run(edit) else None
    if run_dir is not None:
        out = run_dir.eval_dir(protocol)  # the run directory's own eval/<protocol>/
    options = {  # protocol keyword -> (flag, value or None when not given)
        "preserve": ("--preserve", split_list(preserve) or None),
        "prompts": ("--prompts", prompts),
        "n_per_class": ("--n-per-class", n_per_class),
        "seed": ("--seed", seed),
        "categories": ("--category", split_list(category) or None),
        "guidance_from_file": ("--guidance-from-file", guidance_from_file or None),
        "limit": ("--limit", limit),
        "n_samples": ("--n-samples", n_samples),
        "reference": ("--reference-model", reference_model),
        "reference_dir": ("--reference-dir", reference_dir),
        "reference_images": ("--reference-images", reference_images),
        "clip": ("--clip", clip),
        "lpips": ("--no-lpips", True if no_lpips else None),
        "features": ("--no-fid", True if no_fid else None),
        "erase": ("--erase", split_list(erase) or None),
    }
    for name, (flag, value) in options.items():
        if value is not None and name not in accepts:
            raise ValueError(f"{flag} does not apply to protocol {protocol!r}.")
    for flag, value, low in (("--n-per-class", n_per_class, 1), ("--limit", limit, 1), ("--n-samples", n_samples, 1),
                             ("--seed", seed, 0)):  # fmt: skip
        if value is not None and value < low:
            raise ValueError(f"`{flag}` must be >= {low}, got {value}.")
    sampling = SamplingConfig(steps, guidance, batch_size, height, width)  # checked before anything is loaded
    dt, dev = check_runtime(dtype, device)
    kwargs = {name: value for name, (_, value) in options.items() if value is not None}
    if "erase" in accepts and "erase" not in kwargs and edit is not None:
        kwargs["erase"] = Edit.load(edit).request.erase
    for name in ("lpips", "features"):  # --no-lpips / --no-fid
        if kwargs.pop(name, None):
            kwargs[name] = None
    dev = default_device(device)
    if "device" in accepts:  # where the protocol's scorers run
        kwargs["device"] = dev
    pipe = load_configured(model, edit, dtype, device, attention_slicing, no_sdpa, scheduler, revision=revision)
    if reference_model is not None:
        ref = load_pipeline(reference_model)
        sdpa = False if no_sdpa else None
        kwargs["reference"] = configure_pipeline(ref, dt, attention_slicing, dev, sdpa=sdpa, scheduler=scheduler)
    out_dir = out  # the generation folder: images/, index.jsonl (and the metrics.json beside them)
    res = run(pipe, protocol, out_dir=out_dir, sampling=sampling, **kwargs)
    if out:
        recorded = {k: v for k, v in kwargs.items() if k != "reference"}
        record(
            out,
            "evaluate",
            protocol=protocol,
            model=model,
            revision=revision,
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
    if run_dir is not None:
        run_dir.mark("eval", "done", protocol=protocol)
    typer.echo(
        json.dumps({k: v for k, v in res.items() if k not in ("per_class", "per_artist")}, indent=2, default=str)
    )

"""`generate`: prompt sets x seeds -> images (resumable, sharded under accelerate)."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from erasekit import Edit
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
    load_model,
    out_dir,
    split_list,
)
from erasekit.eval.distributed import PROMPT_FORMATS, launch_generation, protocol_items
from erasekit.eval.generate import PromptItem, SamplingConfig, parse_seeds
from erasekit.eval.generate import generate as gen
from erasekit.eval.runtime import configure_pipeline, default_device, runtime_info
from erasekit.io import file_digest, write_json_atomic
from erasekit.methods.hide import KEY_TENSORS, RecoveryKey
from erasekit.pipeline import base_info


def generate(
    out: Annotated[
        Path, typer.Option("--out", "-o", parser=out_dir, help="Output directory (images/ + index.jsonl); resumable.")
    ],
    prompt: Annotated[list[str] | None, typer.Option("--prompt", help="A prompt (repeatable).")] = None,
    prompts: Annotated[Path | None, typer.Option(help="A prompt file in the --protocol's format.")] = None,
    protocol: Annotated[
        str, typer.Option(help="Prompt-file format: lines (one prompt per line), i2p, artists, imagenette, coco.")
    ] = "lines",
    seeds: Annotated[str, typer.Option(help="lines / --prompt: seeds for every prompt, '0:10' or '1,5,7'.")] = "0:4",
    model: ModelOpt = "shapes",
    revision: RevisionOpt = None,
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
    if protocol not in PROMPT_FORMATS:
        raise ValueError(f"Unknown --protocol {protocol!r} for generate; choose one of {', '.join(PROMPT_FORMATS)}.")
    items: list[PromptItem] = []
    if prompts is not None or protocol != "lines":  # the file reader (imagenette also runs without a file)
        items = protocol_items(
            protocol,
            prompts,
            seeds=seeds,
            categories=split_list(category) or None,
            guidance_from_file=guidance_from_file,
            limit=limit,
            n_samples=n_samples,
            n_per_class=n_per_class,
            classes=classes,
            seed=seed,
        )
    if prompt:
        if protocol != "lines":
            raise ValueError(f"--prompt goes with --protocol lines (the default), not {protocol!r}.")
        items += [PromptItem(t, s) for t in prompt for s in parse_seeds(seeds)]
    if not items:
        raise ValueError(f"No prompts: pass --prompt TEXT (repeatable) or --prompts FILE (--protocol {protocol}).")
    sampling = SamplingConfig(steps, guidance, batch_size, height, width)
    check_runtime(dtype, device)  # before anything is loaded or written
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
            revision=revision,
        )
    else:
        runtime["revision"] = revision
        records = _generate_with_key(model, edit, recovery_key, items, out, sampling, runtime, not quiet, extra)
    if records is not None:  # rank 0 (or the only process)
        typer.echo(f"{len(records)} images in {out} (index: {out / 'index.jsonl'})")


def _generate_with_key(model, edit, key_path, items, out: Path, sampling, runtime: dict, progress: bool, extra: dict):
    """One process: the edited model, conditioned through the recovery key's soft tokens
    (:meth:`erasekit.methods.hide.RecoveryKey.prompt_embeds`); ``launch.json`` records the key's identity."""
    if edit is None:
        raise ValueError("--recovery-key needs --edit: the edit the key was made for (the key is checked against it).")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("Generation with --recovery-key runs in one process; run it without `accelerate launch`.")
    if any(it.meta.get("guidance_scale") is not None for it in items):
        raise ValueError("--guidance-from-file cannot be combined with --recovery-key (one guidance scale for all).")
    the_edit = Edit.load(edit)
    pipe = load_model(model, revision=runtime["revision"], for_edits=[the_edit])  # at the edit's dtype
    key = RecoveryKey.load(key_path, edit=the_edit, pipe=pipe)  # refuses a key made for another edit or base
    the_edit.apply_(pipe)
    sdpa = False if runtime["no_sdpa"] else None
    configure_pipeline(
        pipe,
        runtime["dtype"],
        runtime["attention_slicing"],
        default_device(runtime["device"]),
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

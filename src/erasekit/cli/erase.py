"""Commands that make an edit: `methods`, `erase`, `recover`."""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Annotated

import typer

from erasekit import Edit, EraseRequest, available_methods, get_method, load_pipeline
from erasekit.cli.common import (
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    RevisionOpt,
    check_runtime,
    config_from,
    load_model,
    out_dir,
    split_list,
    warn_split_words,
)
from erasekit.eval.generate import parse_seeds
from erasekit.families.memory import OPTIMIZERS, MemoryOptions, check_applies, set_memory_options
from erasekit.methods.base import erase as erasekit_erase
from erasekit.methods.base import fine_tuned_methods, iter_options, make_config, preset_diff, used_when_text
from erasekit.methods.hide import KEY_META, RecoverConfig, RecoveryKey, check_key_dir
from erasekit.methods.hide import recover as run
from erasekit.pipeline import base_info
from erasekit.report.run_report import build_run_report
from erasekit.rundir import RunDir, config_settings
from erasekit.runs import parse_overrides, run_dir


def methods() -> None:
    """List the erasure methods, their presets (what each changes) and their options."""
    for name, spec in available_methods().items():
        typer.secho(f"{name}: {spec.summary}", bold=True)
        for pname, p in spec.presets.items():
            mark = " (default)" if pname == spec.default_preset else ""
            diff = preset_diff(name, pname)
            changes = ", ".join(f"{k}={v!r}" for k, v in diff.items()) or "the defaults below"
            typer.echo(f"  preset {pname}{mark}: {p.summary}; sets {changes}")
        for oname, f, default, _ in iter_options(spec.config_class):
            when = f.metadata.get("used_when")
            note = f"  [read when {used_when_text(when)}]" if when else ""
            typer.echo(f"    {oname} = {default!r}  {f.metadata.get('help', '')}{note}")


def _method_names() -> str:

    return ", ".join(available_methods())


def erase(
    erase: Annotated[list[str], typer.Option("--erase", "-e", help="Concept(s) to erase (repeat or comma-separate).")],
    out: Annotated[
        Path, typer.Option("--out", "-o", parser=out_dir, help="Run directory to write (run.json, edit/, train/, ...).")
    ],
    method: Annotated[
        str, typer.Option(help=f"Erasure method: {_method_names()} (options: `erasekit methods`).")
    ] = "uce",
    preset: Annotated[
        str | None, typer.Option(help="Method preset: paper or authors (default: the method's; `erasekit methods`).")
    ] = None,
    preserve: Annotated[list[str] | None, typer.Option("--preserve", "-p", help="Concept(s) to preserve.")] = None,
    anchor: Annotated[str | None, typer.Option(help="What erased concepts become (default: the empty prompt).")] = None,
    model: ModelOpt = "shapes",
    set_: Annotated[list[str] | None, typer.Option("--set", help="Method option KEY=VALUE (repeatable).")] = None,
    seed: Annotated[
        int | None,
        typer.Option(help="Seed of the method's random draws: its `seed` option (same as --set seed=N; default 0)."),
    ] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    revision: RevisionOpt = None,
    gradient_checkpointing: Annotated[
        bool,
        typer.Option(
            "--gradient-checkpointing",
            help="Fine-tuned methods: recompute the denoiser's activations in the backward pass (less memory).",
        ),
    ] = False,
    optimizer: Annotated[
        str | None,
        typer.Option(
            help=f"Fine-tuned methods: {' or '.join(OPTIMIZERS)} (8-bit Adam needs bitsandbytes; default adam)."
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Allow writing into a non-empty run directory.")] = False,
    report: Annotated[bool, typer.Option(help="Also write RUN/report.html (before/after images, traces).")] = False,
    report_seeds: Annotated[str, typer.Option(help="Seeds of the report's before/after grids.")] = "0:6",
) -> None:
    """Erase concepts from a model and save the edit as a run directory.

    --dtype bfloat16/float16 loads half-precision weights (fine-tuning keeps fp32 master copies of the
    trained tensors); --gradient-checkpointing and --optimizer (erasekit.families.memory) apply to the
    fine-tuned methods only."""
    spec = get_method(method)
    memory = MemoryOptions(gradient_checkpointing=gradient_checkpointing, optimizer=optimizer or "adam")
    check_applies(memory, method, fine_tuned_methods(), given=["optimizer"] if optimizer is not None else [])
    dt, dev = check_runtime(dtype, device)  # a dtype the device cannot run: refused before the (long) load
    if report:  # parsed before the (long) erase, so a bad value fails first
        try:
            grid_seeds = parse_seeds(report_seeds)
        except ValueError as e:
            raise ValueError(str(e).replace("`--seeds", "`--report-seeds")) from None
    request = EraseRequest(split_list(erase), split_list(preserve), anchor)
    overrides = parse_overrides(spec.config_class, set_ or [])
    if seed is not None and any(f.name == "seed" for f in fields(spec.config_class)):
        if "seed" in overrides and overrides["seed"] != seed:
            raise ValueError(f"`--seed {seed}` and `--set seed={overrides['seed']}` disagree; give one of them.")
        overrides["seed"] = seed
    config = make_config(method, preset, **overrides)
    if getattr(config, "key_dir", None):  # hiding: the secret key must not be lost nor shipped
        check_key_dir(config.key_dir, out)
    pipe = load_pipeline(model, device=dev, dtype=dt, revision=revision)
    set_memory_options(pipe, **asdict(memory))
    warn_split_words(pipe, request.erase + request.preserve)
    base = base_info(pipe)
    identity = {
        "method": method,
        "config": config_settings(config),
        "request": asdict(request),
        "base": {"id": base.get("id"), "fingerprint": base.get("fingerprint")},
    }
    for k in ("revision", "dtype"):  # only when given, so that runs made without them keep their identity
        if base.get(k):
            identity["base"][k] = base[k]
    if memory.identity():  # 8-bit Adam changes the result (checkpointing does not)
        identity["memory"] = memory.identity()
    with run_dir(out, overwrite=overwrite) as d:
        rd = RunDir.create(d, identity, force=overwrite)
        t0 = time.time()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("default")
                # no generator: every random draw comes from the config's own `seed` (recorded in the edit)
                edit = erasekit_erase(pipe, request, method, config, progress=True)
        except BaseException as e:
            rd.mark("erase", "failed", error=e)  # kept only where the folder survives (checkpoints to resume)
            raise
        seconds = time.time() - t0
        rd.save_edit(edit)
        rd.mark("erase", "done", seconds=round(seconds, 3), tensors=len(edit.tensors))
    if report:
        page = build_run_report(out, pipe=pipe, seeds=grid_seeds)
    typer.echo(f"{method} erased {request.erase} in {seconds:.2f} s; {len(edit.tensors)} tensors changed -> {out}")
    if report:
        typer.echo(f"report: {page}")


def recover(
    edit: Annotated[
        Path, typer.Option("--edit", help="Run directory (or edit folder) of the edit that hides the concept.")
    ],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", parser=out_dir, help="Folder for the recovery key (outside the edit's folder)."),
    ],
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
    dtype: DtypeOpt = None,
    revision: RevisionOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a recovery key already in --out.")] = False,
) -> None:
    """Recover a hidden concept's prompt from an edit (knowledge hiding stage 2, slides eq. 16).

    Projected gradient descent on soft tokens within an L2 ball of radius rho around the concept's
    embedding; the recovery key is saved in --out, apart from the edit."""
    cfg = config_from(
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
        raise FileExistsError(f"{str(out)!r} already holds a recovery key; pass --overwrite or choose another --out.")
    check_runtime(dtype, device)
    the_edit = Edit.load(edit)
    pipe = load_model(model, dtype=dtype, device=device, revision=revision)
    start = RecoveryKey.load(init, edit=the_edit, pipe=pipe) if init is not None else None
    key = run(pipe, the_edit, cfg, concepts=split_list(concept) or None, init=start)
    config = {
        "recover": asdict(cfg),
        "edit": str(edit),
        "model": model,
        "revision": revision,
        "dtype": dtype,
        "init": str(init) if init else None,
    }
    key = replace(key, meta={**key.meta, "config": config})
    key.save(out)
    dist = key.meta["distance_from_concept"]
    typer.echo(f"recovery key for {key.concepts} -> {out} (final loss {key.meta['final_loss']}, distance {dist})")

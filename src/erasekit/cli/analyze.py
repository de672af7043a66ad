"""`analyze`: an erasure's side effects (spectrum, graph, diff)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from erasekit import Edit
from erasekit.analysis import ClipScorer, DiffConfig, SpectrumConfig, run_diff, run_graph, run_spectra
from erasekit.analysis.spectrum import json_safe
from erasekit.cli.common import (
    App,
    ClipOpt,
    ConceptsOpt,
    DtypeOpt,
    GuidanceOpt,
    ModelOpt,
    RevisionOpt,
    StepsOpt,
    VocabularyOpt,
    check_runtime,
    concepts_from,
    config_from,
    edits_from,
    load_model,
    out_dir,
    record,
)
from erasekit.eval.generate import SamplingConfig, parse_seeds

app = App(
    help="An erasure's side effects: sensitivity spectrum, concept graph, model difference.", no_args_is_help=True
)


@app.command("spectrum")
def analyze_spectrum(
    edit: Annotated[list[str], typer.Option("--edit", help="An edit to analyse: PATH or LABEL=PATH (repeatable).")],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", parser=out_dir, help="Folder for spectrum-*.json, the plots and spectrum.html."),
    ],
    concepts: ConceptsOpt = None,
    vocabulary: VocabularyOpt = None,
    model: ModelOpt = "shapes",
    revision: RevisionOpt = None,
    dtype: DtypeOpt = None,
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
    cfg = config_from(
        SpectrumConfig,
        n_seeds=n_seeds,
        first_seed=first_seed,
        prompt_template=prompt_template,
        score_template=score_template,
        sampling=config_from(SamplingConfig, steps=steps, guidance_scale=guidance, batch_size=batch_size),
    )
    check_runtime(dtype, device)
    edits = edits_from(edit)
    pipe = load_model(model, dtype=dtype, device=device, revision=revision, for_edits=edits.values())
    names = concepts_from(concepts, vocabulary, pipe)
    scorer = ClipScorer.from_pretrained(clip, device=device)
    spectra = run_spectra(pipe, edits, names, scorer, cfg, out, top=top)
    record(
        out,
        "analyze-spectrum",
        model=model,
        revision=revision,
        dtype=dtype,
        edits=edit,
        clip=clip,
        vocabulary=vocabulary,
        concepts=names,
        top=top,
    )
    summary = {label: s.summary() for label, s in spectra.items()}
    typer.echo(json.dumps(json_safe(summary), indent=2))
    typer.echo(f"spectra, plots and spectrum.html in {out}")


@app.command("graph")
def analyze_graph(
    edit: Annotated[
        list[str], typer.Option("--edit", help="An erasure of the graph: PATH or LABEL=PATH (repeatable).")
    ],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", parser=out_dir, help="Folder for graph.json, the heatmap, graph.html and spectra."),
    ],
    concepts: ConceptsOpt = None,
    vocabulary: VocabularyOpt = None,
    model: ModelOpt = "shapes",
    revision: RevisionOpt = None,
    dtype: DtypeOpt = None,
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
    if distance not in ("clip", "text-encoder"):
        raise ValueError(f"--distance must be clip or text-encoder, got {distance!r}.")
    if not 0 < quantile < 1:
        raise ValueError(f"--quantile must be in (0, 1), got {quantile}.")
    cfg = config_from(
        SpectrumConfig,
        n_seeds=n_seeds,
        first_seed=first_seed,
        prompt_template=prompt_template,
        sampling=config_from(SamplingConfig, steps=steps, guidance_scale=guidance, batch_size=batch_size),
    )
    check_runtime(dtype, device)
    edits = edits_from(edit)
    pipe = load_model(model, dtype=dtype, device=device, revision=revision, for_edits=edits.values())
    names = concepts_from(concepts, vocabulary, pipe)
    scorer = ClipScorer.from_pretrained(clip, device=device)
    source = pipe if distance == "text-encoder" else None
    graph, dist = run_graph(pipe, edits, names, scorer, cfg, out, distance_source=source, quantile=quantile)
    record(
        out,
        "analyze-graph",
        model=model,
        revision=revision,
        dtype=dtype,
        edits=edit,
        clip=clip,
        distance=distance,
        quantile=quantile,
        concepts=names,
    )
    typer.echo(json.dumps(json_safe(graph.properties(dist, quantile)), indent=2, default=str))
    typer.echo(f"graph.json, graph_heatmap.png and graph.html in {out}")


@app.command("diff")
def analyze_diff(
    out: Annotated[
        Path, typer.Option("--out", "-o", parser=out_dir, help="Folder for diff.json, diff.png and diff.html.")
    ],
    edit: Annotated[Path | None, typer.Option("--edit", help="The edit of --model to inspect.")] = None,
    edited_model: Annotated[
        str | None, typer.Option(help="Or a whole fine-tuned pipeline (folder or hub id) to compare with --model.")
    ] = None,
    concepts: ConceptsOpt = None,
    vocabulary: VocabularyOpt = None,
    model: ModelOpt = "shapes",
    revision: RevisionOpt = None,
    dtype: DtypeOpt = None,
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
    if (edit is None) == (edited_model is None):
        raise ValueError("Pass exactly one of --edit (an edit of --model) and --edited-model (a second pipeline).")
    cfg = config_from(
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
    check_runtime(dtype, device)
    edited = Edit.load(edit) if edit is not None else load_model(edited_model, dtype=dtype, device=device)
    others = [edited] if isinstance(edited, Edit) else []
    pipe = load_model(model, dtype=dtype, device=device, revision=revision, for_edits=others)
    space = concepts_from(concepts, vocabulary, pipe)
    result = run_diff(
        pipe, edited, space, cfg, out, top=top, image_seeds=seeds, sampling=SamplingConfig(steps, guidance)
    )
    record(
        out,
        "analyze-diff",
        model=model,
        revision=revision,
        dtype=dtype,
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

"""`attack`: red-team an edit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from erasekit import Edit
from erasekit.attacks.asr import DEFAULT_ATTACKS, run_attacks
from erasekit.cli.common import DtypeOpt, ModelOpt, RevisionOpt, check_runtime, load_model, out_dir, split_list
from erasekit.rundir import RunDir


def attack(
    edit: Annotated[Path, typer.Option("--edit", help="Run directory (or edit folder) of the edit to attack.")],
    concept: Annotated[str, typer.Option(help="The erased concept to bring back, e.g. fire or triangle.")],
    attacks: Annotated[
        list[str] | None, typer.Option("--attacks", help="Attacks (comma-separated); default: all.")
    ] = None,
    prompts: Annotated[Path | None, typer.Option(help="A text file of prompts to attack, one per line.")] = None,
    model: ModelOpt = "shapes",
    revision: RevisionOpt = None,
    dtype: DtypeOpt = None,
    n_images: Annotated[int, typer.Option(help="Images per attacked prompt.")] = 1,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", parser=out_dir, help="Resumable output directory (default with --edit RUN: RUN/attacks)."
        ),
    ] = None,
) -> None:
    """Red-team an edit: run attacks that try to bring the erased concept back; print ASR and cost."""
    check_runtime(dtype, "cpu")
    if out is None and RunDir.is_run(edit):
        out = RunDir.open(edit).path / "attacks"  # each attack in RUN/attacks/<name>/ (RunDir.attack_dir)
    texts = None
    if prompts is not None:
        if not prompts.exists():
            raise FileNotFoundError(f"`--prompts` file {str(prompts)!r} does not exist.")
        texts = [line.strip() for line in prompts.read_text().splitlines() if line.strip()]
    the_edit = Edit.load(edit)
    original = load_model(model, dtype=dtype, revision=revision, for_edits=[the_edit])
    edited = load_model(model, the_edit, dtype=dtype, revision=revision)
    res = run_attacks(
        edited,
        original,
        concept,
        split_list(attacks) or DEFAULT_ATTACKS,
        prompts=texts,
        n_images=n_images,
        seed=seed,
        out_dir=out,
    )
    typer.echo(json.dumps(res, indent=2, default=str))

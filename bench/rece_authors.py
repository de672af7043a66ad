"""RECE's ``authors`` preset against a straight port of the official loop, on the miniature (issue 12).

For each of bench/table1.py's 4 splits (erase 5 of the 10 objects, request with no preserved concept, as
table1 and the official default "preserve_false" run), erase with

- ``ours``: ``erasekit.erase(pipe, EraseRequest(split), method="rece", preset="authors-object")``
  (the authors preset with train_object.py's 5 epochs and lambda 1e-3 of eq. 7);
- ``reference``: ``tests/reference_rece.py``'s port of the official loop, in the official float32
  numerics (UCE checkpoint step, then 5 regzero-derive + adversarial-edit epochs);

and evaluate both with the ``shapes-objects`` protocol (50 images per object, seed 0, the miniature's
detector): ESR-1/3 over the erased objects, PSR-1/3 over the other five. The issue asks for ESR-1 and
PSR-1 within 2 points. The final epoch is compared (both run the same 5 epochs). ``--select N`` instead
keeps our run's best epoch by validation ESR-1 (N images per erased object on seeds 1000+, the
protocols' detector; :func:`validation_esr` + ``erasekit.methods.rece.select_epoch``), as the authors'
train.py keeps its lowest-detection-rate epoch. Results are written to ``--out`` after every
(model, split) cell; re-running skips finished cells.

    python bench/rece_authors.py --threads 1                 # all 4 splits (~75 min on one busy core)
    python bench/rece_authors.py --splits 0 --n-per-class 5  # a quick look
    python bench/rece_authors.py --out A --merge B,C         # fold parallel runs B, C into A
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import erasekit
from erasekit.analysis.spectrum import edit_applied
from erasekit.edit import Edit, EraseRequest
from erasekit.eval.detectors import load_detector
from erasekit.eval.generate import generate_images
from erasekit.eval.metrics import esr_k
from erasekit.eval.protocols import evaluate
from erasekit.io import write_json_atomic, write_text_atomic
from erasekit.methods.rece import select_epoch
from erasekit.pipeline import base_info
from erasekit.world.protocols import object_prompts

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
from reference_rece import run_reference  # noqa: E402  (test-only port, tests/reference_rece.py)
from table1 import SPLITS  # noqa: E402

METRICS = ("esr_1", "esr_3", "psr_1", "psr_3")
MODELS = ("ours", "reference", "reference64")  # reference: the port in float32 (official numerics); 64: float64


def make_edit(pipe, model: str, erase: list[str], epochs: int, lamb_derive: float) -> Edit:
    """The RECE edit of ``erase`` by our authors-object preset or by the reference port."""
    request = EraseRequest(erase)
    if model == "ours":
        return erasekit.erase(
            pipe,
            request,
            method="rece",
            preset="authors-object",
            epochs=epochs,
            lamb_derive=lamb_derive,
            progress=False,
        )
    dtype = torch.float64 if model == "reference64" else torch.float32
    tensors = run_reference(pipe, erase, epochs=epochs, regular_scale=lamb_derive, dtype=dtype)[-1]
    tensors = {k: v.float() for k, v in tensors.items()}
    return Edit(tensors=tensors, method=f"rece-{model}", config={}, request=request, base=dict(base_info(pipe)))


def validation_esr(pipe, erase: list[str], n_per_class: int, seed: int, detector) -> Callable[[Edit], float]:
    """A validation score for :func:`erasekit.methods.rece.select_epoch`: ESR-1 of the erased objects on
    held-out seeds (``seed`` onwards; the test seeds start at 0), with the protocols' detector. The
    authors' train.py keeps the epoch with the lowest detection rate, i.e. the highest ESR-1."""
    items = object_prompts(erase, n_per_class, seed)
    labels = np.array([it.meta["label"] for it in items])

    def score(edit: Edit) -> float:
        with edit_applied(pipe, edit):
            images = generate_images(pipe, [it.prompt for it in items], [it.seed for it in items], progress=False)
        return esr_k(detector.predict(images)["object"], labels, 1)

    return score


def weight_gap(a: Edit, b: Edit) -> float:
    """Largest relative Frobenius difference between the two edits' matrices."""
    return max(
        float((a.tensors[k].double() - b.tensors[k].double()).norm() / b.tensors[k].double().norm()) for k in b.tensors
    )


def summarise(cells: dict[str, Any], splits: list[int]) -> str:
    lines = [
        "| model | " + " | ".join(m.upper().replace("_", "-") for m in METRICS) + " |",
        "|---" * (len(METRICS) + 1) + "|",
    ]
    for model in MODELS:
        vals = [[cells[f"{model}|{s}"][m] for s in splits if f"{model}|{s}" in cells] for m in METRICS]
        if vals[0]:
            lines.append(
                f"| {model} | " + " | ".join(f"{100 * np.mean(v):.1f} ± {100 * np.std(v):.1f}" for v in vals) + " |"
            )
    for ref in MODELS[1:]:
        both = [s for s in splits if f"ours|{s}" in cells and f"{ref}|{s}" in cells]
        if not both:
            continue
        lines += ["", f"| split | ESR-1 ours - {ref} | PSR-1 ours - {ref} | weight gap |", "|---|---|---|---|"]
        for s in both:
            o, r = cells[f"ours|{s}"], cells[f"{ref}|{s}"]
            lines.append(
                f"| {s} | {100 * (o['esr_1'] - r['esr_1']):+.1f} | {100 * (o['psr_1'] - r['psr_1']):+.1f} | "
                f"{r.get('weight_gap', float('nan')):.2e} |"
            )
        d_esr = np.mean([cells[f"ours|{s}"]["esr_1"] - cells[f"{ref}|{s}"]["esr_1"] for s in both])
        d_psr = np.mean([cells[f"ours|{s}"]["psr_1"] - cells[f"{ref}|{s}"]["psr_1"] for s in both])
        lines += [
            "",
            f"ours - {ref}, mean over {len(both)} split(s): ESR-1 {100 * d_esr:+.2f} points, PSR-1 {100 * d_psr:+.2f} points "
            "(weight gap: the largest relative Frobenius difference of a K/V matrix).",
        ]
    return "\n".join(lines) + "\n"


def epoch_gaps(pipe, erase: list[str], epochs: int, lamb_derive: float) -> dict[str, list[float]]:
    """Per epoch (0 = UCE step), the largest relative Frobenius difference of a K/V matrix between our
    authors-object checkpoints and the port in float64 / float32 (no images: seconds)."""
    from erasekit.methods.rece import rece_checkpoint

    ours = erasekit.erase(
        pipe,
        EraseRequest(erase),
        method="rece",
        preset="authors-object",
        epochs=epochs,
        lamb_derive=lamb_derive,
        progress=False,
    )
    out: dict[str, list[float]] = {}
    for name, dtype in (("reference64", torch.float64), ("reference", torch.float32)):
        ref = run_reference(pipe, erase, epochs=epochs, regular_scale=lamb_derive, dtype=dtype)
        out[name] = []
        for t in range(epochs + 1):
            mine = rece_checkpoint(pipe, ours, t).tensors
            out[name].append(
                max(float((mine[k].double() - w.double()).norm() / w.double().norm()) for k, w in ref[t].items())
            )
    return out


def _same(recorded: dict[str, Any], settings: dict[str, Any]) -> bool:
    """Whether recorded settings are ``settings`` (the base fingerprint aside; no ``select`` recorded = 0)."""
    return {"select": 0, **{k: v for k, v in recorded.items() if k != "base"}} == settings


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(HERE / "results" / "rece-authors"))
    p.add_argument("--splits", default="0,1,2,3")
    p.add_argument("--n-per-class", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=5, help="train_object.py's default")
    p.add_argument("--lamb-derive", type=float, default=1e-3, help="train_object.py's --regular_scale")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--models", default="ours,reference", help=f"of {', '.join(MODELS)} (e.g. one per parallel run)")
    p.add_argument(
        "--select",
        type=int,
        default=0,
        help="ours only: keep the best epoch by validation ESR-1 with N images per erased object (seeds 1000+)",
    )
    p.add_argument("--gaps", action="store_true", help="only the per-epoch weight gaps (no images) -> gaps.json")
    p.add_argument("--merge", default="", help="comma-separated result folders (same settings) to fold into --out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    splits = [int(s) for s in args.splits.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("n_per_class", "seed", "epochs", "lamb_derive", "select")}
    path = out / "results.json"
    results: dict[str, Any] = {"settings": dict(settings), "cells": {}}
    if path.exists():
        old = json.loads(path.read_text())
        if not _same(old.get("settings", {}), settings):
            raise ValueError(f"{path} holds results for other settings {old.get('settings')}; pass another --out.")
        results = old
    for other in filter(None, args.merge.split(",")):
        theirs = json.loads((Path(other) / "results.json").read_text())
        if not _same(theirs["settings"], settings):
            raise ValueError(f"{other} holds results for other settings {theirs['settings']}.")
        results["cells"].update(theirs["cells"])
        results["settings"]["base"] = theirs["settings"].get("base")
    if args.merge:
        write_json_atomic(path, results)
        write_text_atomic(out / "rece-authors.md", summarise(results["cells"], splits))
        return results
    models = args.models.split(",")
    if set(models) - set(MODELS):
        raise ValueError(f"`--models` must name models of {MODELS}, got {args.models!r}.")
    pipe = erasekit.load_pipeline("shapes")
    if args.gaps:
        gaps = {
            "settings": settings,
            "gaps": {s: epoch_gaps(pipe, SPLITS[s], args.epochs, args.lamb_derive) for s in splits},
        }
        write_json_atomic(out / "gaps.json", gaps)
        return gaps
    results["settings"]["base"] = base_info(pipe)["fingerprint"]
    for s in splits:
        erase = SPLITS[s]
        edits = {"ours": make_edit(pipe, "ours", erase, args.epochs, args.lamb_derive)}  # closed form: ~1 s
        for model in models:
            key = f"{model}|{s}"
            t0 = time.perf_counter()
            if model != "ours":
                edits[model] = make_edit(pipe, model, erase, args.epochs, args.lamb_derive)
            extra: dict[str, Any] = {}
            if args.select and model == "ours" and key not in results["cells"]:
                score = validation_esr(pipe, erase, args.select, 1000, load_detector("shapes"))
                edits[model], scores = select_epoch(pipe, edits[model], score)
                extra = {"selected_epoch": edits[model].trace["selected_epoch"], "validation_esr_1": scores}
            seconds = time.perf_counter() - t0
            if key in results["cells"]:
                continue
            with edit_applied(pipe, edits[model]):
                res = evaluate(
                    pipe,
                    "shapes-objects",
                    erase=erase,
                    n_per_class=args.n_per_class,
                    seed=args.seed,
                    progress=False,
                )
            cell = {m: res[m] for m in METRICS} | {"erase": erase, "erase_seconds": round(seconds, 3)} | extra
            if model != "ours":
                cell["weight_gap"] = weight_gap(edits["ours"], edits[model])
            results["cells"][key] = cell
            write_json_atomic(path, results)
            write_text_atomic(out / "rece-authors.md", summarise(results["cells"], splits))
            print(key, {m: cell[m] for m in METRICS}, flush=True)
    return results


if __name__ == "__main__":
    main()

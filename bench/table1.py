"""The miniature Table 1 (Adversarial Preservation paper, section 5.1; issues 3 and 4).

On the bundled miniature, erase 5 of the 10 objects and keep the other 5, for 4 fixed splits (each
object is erased in exactly two splits). Rows: the original model, UCE, ESD-x, ESD-u, AP, AGE and
knowledge hiding; columns ESR-1/3 and PSR-1/3 (mean +- std over the splits; ``np.std``, ddof 0)
from the ``shapes-objects`` protocol, RSR-1/3 for hiding (images made with the recovery key), and
the wall time of each erasure. The miniature's detector has 10 object classes, so the paper's
top-5 becomes top-3.

Hyperparameters are the papers' (1000 steps, Adam lr 1e-5, eta 1, start guidance 3, DDIM 50, AP:
N_iter 2, eta_search 1e-3, lambda 1, temperature 2) by default. Changes the miniature needs:

- AP is run twice: as paper eq. 5 writes it (L1 target eps(c_t), row "AP") and with ESD's
  negative-guidance target eta = 1 as the authors' script does (row "AP (η=1)"; same erase loss as
  ESD plus AP's preservation, so it isolates what the preservation costs or buys). Both use the
  ``paper`` preset, as does "AGE"; the rows "AP (authors)" and "AGE (authors)" run the ``authors``
  preset (the authors' code: see ``erasekit methods`` and bench/results/ap-authors).
- AP's and AGE's concept space is the miniature's own vocabulary (about 60 words; its text encoder
  never saw other words), so K is that vocabulary (minus the erased objects) instead of 100.
- Compute (2 CPU cores): the measured table used ``--steps 200 --ddim-steps 20 --lr 5e-4`` for every
  fine-tuned row (ESD-x, ESD-u, AP, AGE, hiding alike). 20 DDIM steps is the miniature's own sampler;
  with the paper's lr 1e-5, 200 steps left the objects intact (ESD-x ESR-1 1.2% on split 0), so the
  lr was picked once, before the table, by a pilot on held-out seeds (1000-1009, split 0, ESD-x only):
  the smallest of {5e-4, 2e-3} reaching ESR-1 >= 85% (5e-4: ESR-1 86%, PSR-1 68%; 2e-3: 92%, 36%;
  ESD-u at 5e-4: 84%, 20%). Nothing is tuned per split or per method.
- The main table keeps AP's search step size at the paper's 1e-3. That value assumes the paper's
  budget: 1000 steps on one concept = 2000 Adam updates of its logits. Here 200 steps shared by 5
  erased concepts give each concept's logits ~80 updates, so they move <= ~0.1 while the Gumbel
  noise deciding the hard choice has std 1.28: the search is close to random. ``--search-lr`` and
  ``--exclude-synonyms`` (keep the erased objects' synonyms out of R, as the AGE paper asks of its
  targets) run the experiments that show what an informed search does (bench/results/table1-extra).

Results go to ``--out`` (``results.json`` and ``table1.md``, written atomically after every
(row, split)); re-running skips the (row, split) pairs already done with the same settings.

    python bench/table1.py                        # full table (hours on 2 CPU cores)
    python bench/table1.py --rows original,uce    # some rows
    python bench/table1.py --tiny                 # smoke test: random tiny model, stand-in detector
    python bench/table1.py --out A --merge B,C    # fold the cells of parallel runs B, C into A
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

import erasekit
from erasekit.analysis.spectrum import edit_applied
from erasekit.edit import EraseRequest
from erasekit.eval.generate import SamplingConfig, generate_images
from erasekit.eval.metrics import rsr_k
from erasekit.eval.protocols import evaluate
from erasekit.io import write_json_atomic, write_text_atomic
from erasekit.world.protocols import object_prompts
from erasekit.world.shapes import COLOURS, OBJECTS, SYNONYMS

SPLITS: list[list[str]] = [
    ["circle", "square", "triangle", "star", "heart"],
    ["cross", "ring", "diamond", "hexagon", "crescent"],
    ["circle", "triangle", "heart", "ring", "hexagon"],
    ["square", "star", "cross", "diamond", "crescent"],
]
ROWS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "original": (None, {}),
    "uce": ("uce", {}),
    "rece": ("rece", {}),
    "esd-x": ("esd", {"train_method": "xattn"}),
    "esd-u": ("esd", {"train_method": "noxattn"}),
    # AP and AGE name their preset: "ap"/"age" are the paper's equations (the rows measured before the
    # presets existed, when these were the defaults), "-authors" the authors' code (issue 12).
    "ap": ("ap", {"preset": "paper"}),
    "ap-eta1": ("ap", {"preset": "paper", "negative_guidance": 1.0}),
    "ap-authors": ("ap", {"preset": "authors"}),
    "age": ("age", {"preset": "paper"}),
    "age-authors": ("age", {"preset": "authors"}),
    "hide": ("hide", {}),
}
FINETUNED = {"esd", "ap", "age", "hide"}
LABELS = {
    "original": "Original",
    "uce": "UCE",
    "rece": "RECE",
    "esd-x": "ESD-x",
    "esd-u": "ESD-u",
    "ap": "AP",
    "ap-eta1": "AP (η=1)",
    "ap-authors": "AP (authors)",
    "age": "AGE",
    "age-authors": "AGE (authors)",
    "hide": "Hiding",
}
METRICS = ("esr_1", "esr_3", "psr_1", "psr_3", "rsr_1", "rsr_3")


class SmokeDetector:
    """A stand-in detector for ``--tiny`` (no trained detector exists for a random model): scores are a
    fixed random projection of the image's mean colour. Only the plumbing is tested with it."""

    name, version = "smoke", "0"
    heads = {"object": list(OBJECTS), "colour": list(COLOURS)}

    def __init__(self) -> None:
        g = np.random.default_rng(0)
        self.w = {h: g.normal(size=(3, len(c))) for h, c in self.heads.items()}

    def predict(self, images: np.ndarray) -> dict[str, np.ndarray]:
        x = images.reshape(len(images), -1, 3).mean(1) / 255.0
        out = {}
        for h, w in self.w.items():
            z = x @ w
            e = np.exp(z - z.max(1, keepdims=True))
            out[h] = e / e.sum(1, keepdims=True)
        return out


def recovery_rates(
    pipe, key, erase: list[str], n_per_class: int, sampling: SamplingConfig, detector
) -> dict[str, float]:
    """RSR-1/3: images of the erased objects generated with the recovery key, detected by ``detector``."""
    items = object_prompts(erase, n_per_class)
    embeds = key.prompt_embeds(pipe, [it.prompt for it in items])
    images = generate_images(pipe, None, [it.seed for it in items], sampling, prompt_embeds=embeds)
    probs = detector.predict(images)["object"]
    labels = np.array([it.meta["label"] for it in items])
    return {"rsr_1": rsr_k(probs, labels, 1), "rsr_3": rsr_k(probs, labels, 3)}


def run_cell(pipe, row: str, erase: list[str], args, detector, sampling: SamplingConfig | None) -> dict[str, Any]:
    """Erase (timed) and evaluate one (row, split)."""
    method, extra = ROWS[row]
    preserve = [o for o in OBJECTS if o not in erase]
    request = EraseRequest(erase)
    kw: dict[str, Any] = dict(extra)
    preset = kw.pop("preset", None)
    if method in FINETUNED:
        kw.update(steps=args.steps, lr=args.lr, ddim_steps=args.ddim_steps, seed=args.seed)
    if method in ("ap", "age"):
        kw.update(vocabulary=args.vocabulary, k=args.k)
        if args.search_lr is not None:
            kw.update(search_lr=args.search_lr)
        if args.exclude_synonyms:
            kw.update(exclude=[s for o in erase for s in SYNONYMS[o]])
    key, edit, seconds = None, None, 0.0
    t0 = time.perf_counter()
    if method == "hide":
        from erasekit.methods.hide import HideConfig, hide

        edit, key = hide(pipe, request, HideConfig(**kw), progress=not args.quiet)
    elif method is not None:
        edit = erasekit.erase(pipe, request, method=method, preset=preset, progress=not args.quiet, **kw)
    seconds = time.perf_counter() - t0
    with edit_applied(pipe, edit) if edit is not None else nullcontext():
        res = evaluate(
            pipe,
            "shapes-objects",
            erase=erase,
            preserve=preserve,
            n_per_class=args.n_per_class,
            seed=args.seed,
            sampling=sampling,
            detector=detector,
            progress=not args.quiet,
            # the original model's images are the same in every split: generate them once, reuse them
            out_dir=Path(args.out) / "original-images" if method is None else None,
        )
        cell = {m: res[m] for m in ("esr_1", "esr_3", "psr_1", "psr_3")}
        if key is not None:
            cell.update(recovery_rates(pipe, key, erase, args.n_per_class, sampling or SamplingConfig(), detector))
    cell["erase_seconds"] = round(seconds, 2)
    cell["erase"] = erase
    if edit is not None and edit.config.get("preset") is not None:
        cell["preset"] = edit.config["preset"]
        if "search_lr" in edit.config:
            cell["search_lr"] = edit.config["search_lr"]
    if edit is not None and "log" in edit.trace:
        cell["chosen"] = [
            # (erased, chosen concept, the chosen concept's probability under the search's logits)
            [
                r["step"],
                [[a["erase"], a.get("concept"), a.get("p")] for a in r.get("adversarial", r.get("targets", []))],
            ]
            for r in edit.trace["log"]
            if r.get("adversarial") or r.get("targets")
        ]
    return cell


def summarise(results: dict[str, Any], rows: list[str], n_splits: int) -> str:
    """The markdown table: mean +- std over splits (percent) and mean erase time."""
    head = "| Method | ESR-1 | ESR-3 | PSR-1 | PSR-3 | RSR-1 | RSR-3 | erase time (s) | splits |\n|---|---|---|---|---|---|---|---|---|\n"
    lines = []
    for row in rows:
        cells = [results["cells"][f"{row}|{s}"] for s in range(n_splits) if f"{row}|{s}" in results["cells"]]
        if not cells:
            continue
        out = [LABELS.get(row, row)]
        for m in METRICS:
            vals = [100 * c[m] for c in cells if c.get(m) is not None]
            out.append(f"{np.mean(vals):.1f} ± {np.std(vals):.1f}" if vals else "n/a")
        out.append(f"{np.mean([c['erase_seconds'] for c in cells]):.1f}")
        out.append(str(len(cells)))
        lines.append("| " + " | ".join(out) + " |")
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows from {list(ROWS)}")
    p.add_argument("--splits", default="0,1,2,3", help="comma-separated split indices (0-3)")
    p.add_argument("--steps", type=int, default=1000, help="fine-tuning steps (paper: 1000)")
    p.add_argument("--lr", type=float, default=1e-5, help="Adam learning rate of the fine-tuning (paper: 1e-5)")
    p.add_argument("--ddim-steps", type=int, default=50, help="DDIM steps of the z_t sampler (paper: 50)")
    p.add_argument("--n-per-class", type=int, default=50, help="images per object (issue 3: at least 50)")
    p.add_argument("--k", type=int, default=None, help="AP/AGE K (default: the miniature vocabulary)")
    p.add_argument("--vocabulary", default="auto", help="AP/AGE vocabulary (auto = shapes on the miniature)")
    p.add_argument(
        "--search-lr",
        type=float,
        default=None,
        help="AP/AGE step size of the adversarial search on the logits (default: the method's, 1e-3)",
    )
    p.add_argument(
        "--exclude-synonyms",
        action="store_true",
        help="AP/AGE: keep the erased objects' synonyms out of the search space (AGE paper: not synonyms)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/table1", help="output folder (results.json, table1.md)")
    p.add_argument(
        "--tiny", action="store_true", help="smoke test: random tiny model, stand-in detector, 2 sampling steps"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--merge",
        default="",
        help="comma-separated --out folders of parallel runs: fold their cells into --out, print the table, run nothing",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    splits = [int(s) for s in args.splits.split(",") if s.strip()]
    if any(not 0 <= s < len(SPLITS) for s in splits):
        p.error(f"--splits must be in 0..{len(SPLITS) - 1}")
    sampling, detector = None, None
    if args.tiny:
        from erasekit.testing import tiny_pipeline

        pipe, sampling, detector = (
            tiny_pipeline(0),
            SamplingConfig(steps=2, guidance_scale=3.0, batch_size=50),
            SmokeDetector(),
        )
        if args.vocabulary == "auto":
            args.vocabulary = "shapes"
    else:
        from erasekit.eval.detectors import load_detector

        pipe = erasekit.load_pipeline(args.model)
        detector = load_detector("shapes")  # also scores the recovery-key images (RSR) of the hiding row
    settings = {
        "model": "tiny" if args.tiny else args.model,
        "base": erasekit.pipeline.base_info(pipe).get("fingerprint"),
        "steps": args.steps,
        "lr": args.lr,
        "ddim_steps": args.ddim_steps,
        "n_per_class": args.n_per_class,
        "k": args.k,
        "vocabulary": args.vocabulary,
        "seed": args.seed,
        "splits": SPLITS,
    }
    # recorded only when set, so that runs made before these flags existed still merge
    if args.search_lr is not None:
        settings["search_lr"] = args.search_lr
    if args.exclude_synonyms:
        settings["exclude_synonyms"] = True
    out = Path(args.out)
    path = out / "results.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"settings": settings, "cells": {}}
    if results["settings"] != settings:
        raise SystemExit(
            f"{path} was made with other settings ({results['settings']}); use another --out or the same settings."
        )
    for other in [Path(m.strip()) for m in args.merge.split(",") if m.strip()]:
        theirs = json.loads((other / "results.json").read_text())
        if theirs["settings"] != settings:
            raise SystemExit(f"{other / 'results.json'} was made with other settings; cannot merge it.")
        results["cells"].update({k: v for k, v in theirs["cells"].items() if k not in results["cells"]})
    if args.merge:
        write_json_atomic(path, results)
        rows = []  # merging only
    for row in rows:
        for s in splits:
            key = f"{row}|{s}"
            if key in results["cells"]:
                continue
            print(f"== {row} split {s}: erase {SPLITS[s]}", flush=True)
            results["cells"][key] = run_cell(pipe, row, SPLITS[s], args, detector, sampling)
            write_json_atomic(path, results)
            write_text_atomic(out / "table1.md", summarise(results, list(ROWS), len(SPLITS)))
    table = summarise(results, list(ROWS), len(SPLITS))
    write_text_atomic(out / "table1.md", table)
    if args.tiny:
        print("SMOKE TEST: random tiny model and a stand-in detector; the numbers mean nothing.")
    print(table)
    return results


if __name__ == "__main__":
    main()
